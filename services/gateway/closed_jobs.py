"""Closed jobs: the gateway's word that nobody waits for a job's answer any more.

When a request ends without its queued job's answer -- the caller went
away, the worker fell silent, the deadline passed -- the gateway cancels the
job (a broadcast, heard only by workers connected now)
and also writes a small marker to Redis, with the job's remaining deadline
as its TTL. A worker reads it only before it runs a job *again* (a
redelivery after its holder died or was dropped), so that a caller who
already had an error does not pay for a second upstream call; the normal
path costs no Redis call on either side.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.clock import now_ms
from shared.names import Names
from shared.tasks import TaskSet
from shared.wire import ChatJob


class ClosedJobs:
    """Writes closed markers in the background; owned by the gateway process."""

    def __init__(self, redis: Redis, names: Names, *, timeout_s: float) -> None:
        self._redis = redis
        self._names = names
        self._timeout_s = timeout_s
        self._tasks = TaskSet()

    def close(self, job: ChatJob) -> None:
        """Mark ``job`` closed; returns at once (safe while being cancelled)."""
        ttl_ms = job.deadline_ms - now_ms()
        if ttl_ms > 0:  # past its deadline, every worker drops it anyway
            self._tasks.spawn(self._write(job.job_id, ttl_ms))

    async def _write(self, job_id: str, ttl_ms: int) -> None:
        # Best effort: with Redis down the marker is lost, and a redelivered job
        # runs again as it did before markers existed (its caller is not harmed).
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(self._names.closed_job(job_id), b"1", px=ttl_ms)

    async def aclose(self) -> None:
        """Let pending writes finish (briefly), then cancel them."""
        await self._tasks.close(grace_s=self._timeout_s)
