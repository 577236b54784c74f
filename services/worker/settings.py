"""The worker's settings (environment, prefix ``BOTLINE_``), and its model endpoints."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import CommonSettings


class EndpointConfig(BaseModel):
    """A model endpoint the workers can call; bots name one of these.

    ``kind = "openai"`` is any OpenAI-compatible server (OpenAI, DeepSeek,
    Qwen, Moonshot, vLLM, Ollama's ``/v1``, llama.cpp); ``kind = "echo"`` is
    the built-in model that repeats the last user message. The upstream's API
    key is read from the environment variable named by ``api_key_env`` and
    lives only in the worker's environment.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["openai", "echo"]
    base_url: str = ""
    api_key_env: str = ""
    timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(64, ge=1)
    # echo only: the pause before each word, to look like a model thinking.
    delay_ms: float = Field(20.0, ge=0)


class WorkerSettings(CommonSettings):
    """Everything a worker needs to know."""

    worker_id: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    # Jobs in flight at once (the AMQP prefetch).
    concurrency: int = Field(64, ge=1)
    # Model endpoints as JSON ({"name": {...}}), and/or a TOML file with an
    # [endpoints.NAME] table each. The built-in "echo" exists unless overridden.
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)
    endpoints_file: Path | None = None

    # The first delta goes out at once; later ones are merged for this long
    # or up to this many characters, so one AMQP message carries many tokens.
    coalesce_ms: float = Field(20.0, ge=0)
    coalesce_chars: int = Field(4096, ge=1)
    # The events a second this worker aims to send in all, across its streams:
    # under load the windows widen rather than the CPU melting into AMQP
    # overhead (each event costs the same CPU end to end, whatever it holds).
    # Why this default and not twice it: docs/performance.md.
    events_per_s: float = Field(1000.0, gt=0)
    # Whole answers are sent in as few events as possible: one every this
    # long at most (a sign of life for the gateway's event timeout), or when
    # this much text is waiting.
    whole_window_ms: float = Field(5000.0, ge=0)
    whole_chars: int = Field(65536, ge=1)
    # While a whole answer runs, a small beat event this often: when its
    # gateway is gone the beat bounces and the job stops (a stream's deltas
    # do that already). Cheap: a few hundred bytes a job every beat.
    beat_ms: float = Field(150.0, gt=0)
    # The one Redis read a worker makes (before running a job again) waits this long at most.
    redis_timeout_s: float = Field(1.0, gt=0)

    # On SIGTERM: stop taking jobs, give running ones this long, then cancel.
    drain_timeout_s: float = Field(30.0, ge=0)
    # When set, touched every few seconds: a liveness probe for containers.
    health_file: Path | None = None

    def all_endpoints(self) -> dict[str, EndpointConfig]:
        """The built-in echo endpoint, then the file's, then the environment's."""
        found: dict[str, EndpointConfig] = {"echo": EndpointConfig(kind="echo")}
        if self.endpoints_file is not None:
            data = tomllib.loads(self.endpoints_file.read_text())
            for name, raw in data.get("endpoints", {}).items():
                found[name] = EndpointConfig.model_validate(raw)
        found.update(self.endpoints)
        return found
