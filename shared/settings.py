"""Settings both services share; each service extends them with its own class.

Read from the environment (prefix ``BOTLINE_``) once, in a service's
``main()``, and passed down -- never read at import time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.names import Names


class CommonSettings(BaseSettings):
    """Connections, namespace, logging and the job queue's shape."""

    model_config = SettingsConfigDict(env_prefix="BOTLINE_", extra="ignore")

    # With Sentinels set, the URL gives only the database and credentials and
    # the master's address is asked of the Sentinels ("host:port,host:port").
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "botline"
    # One URL, or a cluster's nodes comma-separated: tried in turn, at start
    # and whenever the connection in use is lost.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    namespace: str = Field("botline", pattern=r"^[A-Za-z0-9_-]{1,64}$")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON when stderr is not a terminal, coloured lines when it is.
    log_format: Literal["auto", "json", "console"] = "auto"

    # The job queue's arguments. Every process declares the queue, and RabbitMQ
    # refuses a declaration whose arguments differ, so all must agree.
    jobs_max_length: int = Field(10_000, ge=1)
    # Redeliveries before a job is dead-lettered: a job that kills every
    # worker must not go round forever (RabbitMQ sets no limit of its own).
    jobs_delivery_limit: int = Field(3, ge=1)
    # classic: fast, lost with its node. quorum: replicated over a cluster's
    # nodes, so queued jobs survive a node loss, at a CPU cost
    # (docs/performance.md). Changing it needs the queue deleted first.
    jobs_queue_type: Literal["classic", "quorum"] = "classic"
    # A priority queue (x-max-priority, classic queues only: RabbitMQ 3.10's
    # quorum queues have no priorities and refuse the argument). Changing it
    # needs the jobs queue deleted first (docs/architecture.md, Scheduling).
    jobs_priorities: bool = True

    amqp_heartbeat_s: int = Field(10, ge=1)
    # One connect attempt (TCP, AMQP handshake, then declaring the topology).
    amqp_connect_timeout_s: float = Field(5.0, gt=0)
    # How long a starting process keeps trying to reach RabbitMQ.
    startup_timeout_s: float = Field(30.0, gt=0)

    # Bot ids as a Prometheus label (one series per bot and label set): off by
    # default, since a fleet of thousands of bots would make /metrics unusable.
    metrics_bot_labels: bool = False

    # Once started, a process freezes its start-up heap and runs the
    # collector's first generation every this many container objects
    # (Python's default is 700); 0 leaves the collector as Python sets it
    # (shared.loop.settle_heap).
    gc_threshold: int = Field(10_000, ge=0)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"a Sentinel is host:port, not {address!r}")
        return value

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs, in the order they are tried."""
        urls = [u.strip() for u in self.amqp_url.get_secret_value().split(",") if u.strip()]
        if not urls:
            raise ValueError("BOTLINE_AMQP_URL names no broker")
        return urls

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels as (host, port); empty when Redis is reached directly."""
        found = []
        for address in self.redis_sentinels:
            host, _, port = address.rpartition(":")
            found.append((host.strip("[]"), int(port)))
        return found

    @property
    def names(self) -> Names:
        """The queue, exchange and key names of this namespace."""
        return Names(self.namespace)
