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
    # Per worker process: calls in flight at once.
    max_concurrency: int = Field(64, ge=1)
    # echo only: the pause before each word, to look like a model thinking.
    delay_ms: float = Field(20.0, ge=0)

    # A stream whose first piece takes longer than this moves to the bot's next
    # endpoint (a whole answer's first piece is the whole answer: timeout_s).
    first_byte_timeout_s: float = Field(30.0, gt=0)
    # Fleet-wide cooldown: this many failures within the window cool the
    # endpoint down for cooldown_s on every worker; then one probe request
    # decides whether traffic returns.
    cooldown_failures: int = Field(5, ge=1)
    cooldown_window_s: float = Field(30.0, gt=0)
    cooldown_s: float = Field(30.0, gt=0)
    # The provider's limits for the whole fleet (its account's, not a process's);
    # None: not declared. rpm and tpm count over WorkerSettings.budget_window_s.
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_in_flight: int | None = Field(None, ge=1)

    @property
    def budgeted(self) -> bool:
        """Whether the endpoint declares any fleet-wide capacity."""
        return bool(self.rpm or self.tpm or self.max_in_flight)


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

    # Redis holds the fleet's endpoint state (cooldowns, pauses, budgets). It
    # must answer fast: past this the worker goes on without it (fail open).
    redis_timeout_s: float = Field(0.5, gt=0)
    # Before the first delta, a failed call moves to the next endpoint after
    # this pause (doubled per failure, jittered, at most 2 s); a job makes at
    # most endpoint_attempts calls that fail.
    fallback_backoff_ms: float = Field(50.0, ge=0)
    endpoint_attempts: int = Field(4, ge=1)
    # A 429 without Retry-After pauses the endpoint this long; a Retry-After
    # is honoured up to retry_after_max_s.
    pause_default_s: float = Field(1.0, ge=0)
    retry_after_max_s: float = Field(600.0, gt=0)
    # Declared rpm/tpm count over this window (providers count per minute;
    # tests shorten it), widened by the margin against the jitter between
    # taking capacity and the provider counting the call.
    budget_window_s: float = Field(60.0, gt=0)
    budget_margin_s: float = Field(1.0, ge=0)
    # A job waits for capacity only while this much of its deadline would be
    # left for the answer; otherwise it is refused at once.
    answer_reserve_s: float = Field(1.0, ge=0)

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
