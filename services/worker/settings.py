"""The worker's settings (environment, prefix ``BOTLINE_``), and its model endpoints."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.settings import CommonSettings

# An endpoint's calls in flight per worker process when it declares no cap.
DEFAULT_ENDPOINT_CONCURRENCY = 1000
# What one job in flight may cost a worker process in memory, for the automatic
# prefetch: the job message (a history of a few KiB, up to the gateway's body
# limit), the upstream connection and its read buffer, the task and coalescer.
# The worker grew by ~70 KiB of RSS per open stream with ~950 streams open
# (bench stream-c1000, which prints it); counted generously here, since the
# prefetch is a promise to hold that many at once, and histories vary.
JOB_MEMORY_BYTES = 256 * 1024
# The share of this machine's (or container's) memory the worker processes may
# fill with jobs in flight; the rest is for everything else running there.
MEMORY_SHARE = 0.5
# The automatic prefetch never goes above this: beyond it one worker would hoard
# a backlog that scaling out could run (the queue looks empty to an autoscaler
# while one worker holds thousands of unstarted jobs).
MAX_AUTO_PREFETCH = 4096


def memory_limit_bytes() -> int:
    """The memory this process may use: its cgroup's limit when lower than the machine's."""
    found = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (cgroup v2) or a huge number (v1): no limit
            found = min(found, int(text))
    return found


def auto_prefetch(endpoints: dict[str, EndpointConfig], processes: int, memory: int) -> int:
    """The default jobs in flight per worker process (``BOTLINE_CONCURRENCY`` unset).

    As many as the endpoints together take (the sum of their caps: more would only
    wait inside this worker for a slot), bounded by what memory holds when
    ``processes`` worker processes share it, and by :data:`MAX_AUTO_PREFETCH`.
    """
    by_memory = int(memory * MEMORY_SHARE) // (JOB_MEMORY_BYTES * processes)
    by_endpoints = sum(cfg.max_concurrency for cfg in endpoints.values())
    return max(1, min(by_endpoints, by_memory, MAX_AUTO_PREFETCH))


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
    # Calls in flight per worker process. High by default: a model call mostly
    # waits, so a small cap queues streams behind each other inside the worker
    # (the 65th stream waiting for a whole earlier one); declare a lower one for
    # an upstream that cannot take this many (a local llama.cpp with 4 slots).
    max_concurrency: int = Field(DEFAULT_ENDPOINT_CONCURRENCY, ge=1)
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
    # Jobs in flight at once per worker process (the AMQP prefetch); 0, the
    # default, works it out (auto_prefetch): after validation it is never 0.
    concurrency: int = Field(0, ge=0)
    # Worker processes on this machine (`botline worker --processes N`): they
    # share its memory, which the automatic prefetch divides between them.
    processes: int = Field(1, ge=1, le=256)
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

    # Redis holds closed-job markers, read before a job runs again, and the
    # fleet's endpoint state (cooldowns, pauses, budgets). It must answer fast:
    # past this the worker goes on without it (fail open: a job run once too
    # often, an endpoint called without its fleet-wide check).
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
    # The probe server (/livez, /readyz): loopback by default like the
    # gateway; 0.0.0.0 in containers so the orchestrator can reach it.
    worker_http_host: str = "127.0.0.1"
    worker_http_port: int = Field(8081, ge=0, le=65535)

    # The heartbeat in Redis that lists this worker (GET /admin/api/workers):
    # renewed this often, gone this long after the last renewal.
    heartbeat_s: float = Field(3.0, gt=0)
    heartbeat_ttl_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _resolve_concurrency(self) -> Self:
        if self.concurrency == 0:
            try:
                endpoints = self.all_endpoints()
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"endpoints_file: {type(exc).__name__}: {exc}") from exc
            self.concurrency = auto_prefetch(endpoints, self.processes, memory_limit_bytes())
        return self

    def all_endpoints(self) -> dict[str, EndpointConfig]:
        """The built-in echo endpoint, then the file's, then the environment's."""
        found: dict[str, EndpointConfig] = {"echo": EndpointConfig(kind="echo")}
        if self.endpoints_file is not None:
            data = tomllib.loads(self.endpoints_file.read_text())
            for name, raw in data.get("endpoints", {}).items():
                found[name] = EndpointConfig.model_validate(raw)
        found.update(self.endpoints)
        return found
