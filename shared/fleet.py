"""The fleet of workers as Redis sees it: each worker's heartbeat, and who is alive.

A worker writes its :class:`Heartbeat` every few seconds under its own key
with a TTL (``names.worker(id)``) and adds its id to a set
(``names.workers``): the key says it is alive, the set lets a reader find the
keys without a SCAN. A worker that dies stops renewing and its key expires;
the next reader drops its id from the set. A worker that stops cleanly
deletes both at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import Names
from shared.tasks import idle

log = structlog.get_logger("botline.fleet")


class Heartbeat(BaseModel):
    """What a worker says of itself: who, which version, what it serves, how busy."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    version: str
    host: str = ""
    endpoints: list[str] = Field(default_factory=list)
    jobs_in_flight: int = 0
    # Jobs it takes at once (its prefetch, BOTLINE_CONCURRENCY).
    capacity: int = 0
    started_at: int = Field(0, description="epoch milliseconds")
    seen_at: int = Field(0, description="epoch milliseconds of this heartbeat")


async def beat(redis: Redis, names: Names, heartbeat: Heartbeat, ttl_s: float) -> None:
    """Publish a heartbeat, alive for ``ttl_s`` unless renewed."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(
            names.worker(heartbeat.worker_id), heartbeat.model_dump_json(), px=int(ttl_s * 1000)
        )
        pipe.sadd(names.workers, heartbeat.worker_id)
        await pipe.execute()


async def leave(redis: Redis, names: Names, worker_id: str) -> None:
    """Withdraw a worker's heartbeat at once (a clean stop)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(names.worker(worker_id))
        pipe.srem(names.workers, worker_id)
        await pipe.execute()


async def live_workers(redis: Redis, names: Names) -> list[Heartbeat]:
    """The workers whose heartbeat has not expired, by id; forgets the others."""
    ids = sorted(
        member.decode() if isinstance(member, bytes) else str(member)
        for member in await redis.smembers(names.workers)
    )
    if not ids:
        return []
    raw = await redis.mget([names.worker(i) for i in ids])
    alive: list[Heartbeat] = []
    gone: list[str] = []
    for worker_id, data in zip(ids, raw, strict=True):
        if data is None:
            gone.append(worker_id)
            continue
        try:
            alive.append(Heartbeat.model_validate_json(data))
        except ValidationError:
            gone.append(worker_id)  # not a heartbeat we can read: not listed
    if gone:
        # A worker whose beat lands between our MGET and this SREM is left out
        # of the set until its next beat re-adds it: late by one beat, never lost.
        await redis.srem(names.workers, *gone)
    return alive


async def beat_once(redis: Redis, names: Names, heartbeat: Heartbeat, ttl_s: float) -> bool:
    """Publish one heartbeat within ``ttl_s``; False (logged by the caller) when Redis failed."""
    try:
        async with asyncio.timeout(ttl_s):
            await beat(redis, names, heartbeat, ttl_s)
    except (RedisError, OSError, TimeoutError):
        return False
    return True


async def keep_beating(
    redis: Redis,
    names: Names,
    current: Callable[[], Heartbeat],
    *,
    every_s: float,
    ttl_s: float,
) -> None:
    """Publish ``current()`` every ``every_s``, first after one period; run as a task.

    Redis being away is logged once per outage and never stops the worker:
    its jobs do not depend on being listed.
    """
    failing = False
    while True:
        await idle(every_s)
        ok = await beat_once(redis, names, current(), ttl_s)
        if not ok and not failing:
            log.warning("fleet.heartbeat_failed")
        elif ok and failing:
            log.info("fleet.heartbeat_resumed")
        failing = not ok
