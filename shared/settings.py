"""Settings both services share; each service extends them with its own class.

Read from the environment (prefix ``BOTLINE_``) once, in a service's
``main()``, and passed down -- never read at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.names import Names


class CommonSettings(BaseSettings):
    """Connections, namespace, logging and the job queue's shape."""

    model_config = SettingsConfigDict(env_prefix="BOTLINE_", extra="ignore")

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
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

    amqp_heartbeat_s: int = Field(10, ge=1)
    # How long a starting process keeps trying to reach RabbitMQ.
    startup_timeout_s: float = Field(30.0, gt=0)

    # Bot ids as a Prometheus label (one series per bot and label set): off by
    # default, since a fleet of thousands of bots would make /metrics unusable.
    metrics_bot_labels: bool = False

    @property
    def names(self) -> Names:
        """The queue, exchange and key names of this namespace."""
        return Names(self.namespace)
