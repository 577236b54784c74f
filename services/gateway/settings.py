"""The gateway's settings (environment, prefix ``BOTLINE_``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from services.gateway.admin_tokens import check_admin_tokens, split_admin_tokens
from shared.settings import CommonSettings


class GatewaySettings(CommonSettings):
    """Everything the HTTP edge needs to know."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # A name for this process's reply queue; random when empty.
    gateway_id: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    # Gateway processes sharing the port (`botline gateway --processes N`): each
    # listens with SO_REUSEPORT, the kernel spreading connections over them.
    processes: int = Field(1, ge=1, le=256)

    request_deadline_s: float = Field(120.0, gt=0)
    # After the first event, the longest silence tolerated from a worker: a
    # frozen worker is otherwise noticed only by AMQP heartbeats.
    event_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)

    # Redis must answer fast or not at all: the auth lookup is on every
    # uncached request, and redis-py's defaults wait about a minute.
    redis_timeout_s: float = Field(1.0, gt=0)
    # Connections to Redis at most; more concurrent calls wait for one (up to
    # the timeout above). One is the key cache's subscription.
    redis_max_connections: int = Field(64, ge=2)
    # A cached key is trusted this long at most, even without invalidations.
    key_cache_ttl_s: float = Field(60.0, gt=0)
    key_cache_size: int = Field(100_000, ge=1)
    # Well-formed keys Redis does not know are cached apart, smaller and shorter,
    # so that invented keys cannot push real ones out.
    unknown_key_cache_ttl_s: float = Field(5.0, gt=0)
    unknown_key_cache_size: int = Field(10_000, ge=1)
    # Failed key checks per client address (request.remote) and minute, in this
    # process, before that address gets 429s for the rest of the minute; 0: off.
    auth_failures_per_minute: int = Field(30, ge=0)

    # Requests in flight hold a lease per limited key; a dead gateway's expire after this.
    lease_ttl_s: float = Field(30.0, gt=0)
    # Usage counts and keys' last use are written to Redis this often.
    usage_flush_s: float = Field(1.0, gt=0)
    # Tokens for the admin API and page (JSON list or comma-separated); none: admin off.
    # Blank entries are dropped (a template's unset variable must not become a
    # token that an absent header matches); each must be MIN_ADMIN_TOKEN_CHARS or longer.
    admin_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    @field_validator("admin_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        return split_admin_tokens(value)

    @field_validator("admin_tokens")
    @classmethod
    def _check_tokens(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        check_admin_tokens([t.get_secret_value() for t in tokens])
        return tokens

    publish_timeout_s: float = Field(5.0, gt=0)

    # Fair share (services/gateway/fair_share.py): how often the fleet's
    # capacity is read from the workers' heartbeats, and the part of the jobs
    # queue that keys over their share may fill together before they are refused.
    fair_refresh_s: float = Field(2.0, gt=0)
    fair_queue_share: float = Field(0.5, ge=0, le=1)
    # The part of the fleet's job slots (rounded down: none below 20 slots at
    # 0.05) kept free for keys within their share: a job of a key over its
    # share waits in the gateway while this gateway's jobs in flight would
    # leave less free; 0: no reserve (such jobs are only queued lower).
    fair_reserve_share: float = Field(0.05, ge=0, le=0.5)
    # The part of its deadline a job may wait in the queue for a free worker
    # before it is refused 503 overloaded (Retry-After from the measured
    # drain rate); 1 (the default): the whole deadline, as before, and no
    # start beat from the worker.
    queue_wait_share: float = Field(1.0, gt=0, le=1)
    # A low job still waiting in the queue after this is published again as
    # normal, after twice this as high (the first copy a worker takes runs;
    # low jobs cost their worker one Redis call for that); 0: no aging.
    priority_aging_s: float = Field(30.0, ge=0)

    # Idle connections close after this; so does one whose request head is not
    # complete by then (aiohttp arms the timer when the connection opens).
    keepalive_timeout_s: float = Field(75.0, gt=0)
    shutdown_timeout_s: float = Field(30.0, ge=0)
