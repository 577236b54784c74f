"""Fair share between keys: each active key's part of the fleet's job slots.

The fleet's capacity is the sum of the live workers' job slots (their
heartbeats, shared/fleet.py), read every ``fair_refresh_s`` in the
background: no Redis call per request. A key's share is that capacity
divided by the keys with requests in flight *in this gateway*
(:class:`~services.gateway.inflight.InFlight` counts them anyway).

A request over its key's share is not refused: its job is published one
priority step lower (shared/priority.py), so every other key's jobs of the
same class go ahead of it on the queue, and it runs when they are done.
Only a key that also holds more than its part of the queue itself
(``fair_queue_share`` of ``jobs_max_length``, split between the active
keys) is refused 503 ``overloaded``: the queue's room is kept for the
others, who would otherwise be refused by a full queue.

A priority only orders jobs that wait, and slots taken together by a flood
free together. So a reserve of the fleet's slots (``fair_reserve_share`` of
the capacity, rounded down) is kept for keys within their share: the shares
are parts of the slots outside it, and a lowered job waits in this gateway
while its jobs in flight leave no more than the reserve free
(:class:`~services.gateway.slots.Slots`).
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.inflight import InFlight
from services.gateway.job_client import Drain
from services.gateway.metrics import GatewayMetrics
from services.gateway.slots import Slots
from shared.errors import Overloaded
from shared.fleet import live_workers
from shared.names import Names
from shared.priority import Priority, message_priority
from shared.tasks import idle

log = structlog.get_logger("botline.gateway.fair_share")


class Placement(NamedTuple):
    """Where a job goes: its message priority, and whether its key is over its share."""

    priority: int
    lowered: bool


class FairShare:
    """Places each job on the queue by its class and its key's share."""

    def __init__(
        self,
        redis: Redis,
        names: Names,
        inflight: InFlight,
        *,
        refresh_s: float,
        queue_slots: int,
        timeout_s: float,
        reserve_share: float = 0.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._names = names
        self._inflight = inflight
        self._refresh_s = refresh_s
        self._queue_slots = queue_slots
        self._timeout_s = timeout_s
        self._reserve_share = reserve_share
        self._metrics = metrics
        # This gateway's jobs in flight, and the lowered ones held for the reserve.
        self.slots = Slots()
        # The fleet's job slots; 0 until the first read (then no key is over).
        self._capacity = 0
        # This gateway's measured drain rate, for a refusal's Retry-After.
        self.drain: Drain | None = None

    @property
    def capacity(self) -> int:
        """The fleet's job slots (0: not known yet)."""
        return self._capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        self._capacity = capacity
        reserve = self.reserve
        # Lowered jobs wait only while there is a reserve to keep.
        self.slots.set_limit(capacity - reserve if reserve else None)

    @property
    def reserve(self) -> int:
        """The fleet's slots kept for keys within their share (0: none)."""
        # Rounded down; the epsilon keeps 100 x 0.29 at 29, not 28.999...
        return int(self._capacity * self._reserve_share + 1e-9)

    async def refresh(self) -> None:
        """Read the fleet's capacity once from the workers' heartbeats."""
        async with asyncio.timeout(self._timeout_s):
            workers = await live_workers(self._redis, self._names)
        self.capacity = sum(w.capacity for w in workers)

    async def run(self) -> None:
        """Keep the capacity current; run as a task."""
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError, TimeoutError) as exc:
                # The last capacity known stays: shares are only an ordering.
                log.warning("fair_share.refresh_failed", error=type(exc).__name__)
            await idle(self._refresh_s)

    def share(self) -> int:
        """Each active key's part of the fleet's slots outside the reserve (0: not known yet)."""
        if not self.capacity:
            return 0
        return max(1, (self.capacity - self.reserve) // max(self._inflight.active_keys, 1))

    def place(self, key_hash: str, priority: Priority) -> Placement:
        """Where a new job of this key goes (the key's request already tracked in flight).

        Raises :class:`Overloaded` when the key holds its share of the slots
        and its part of the queue too.
        """
        share = self.share()
        held = self._inflight.count(key_hash)
        over = bool(share) and held > share
        if over and self._queue_slots:
            queued_part = max(1, self._queue_slots // max(self._inflight.active_keys, 1))
            if held > share + queued_part:
                if self._metrics is not None:
                    self._metrics.fair_share.labels("refused").inc()
                error = Overloaded("this key has its share of the queue waiting; try again shortly")
                if self.drain is not None:
                    # When the key's jobs beyond its share will have drained.
                    error.retry_after = self.drain.retry_after(held - share, 1.0)
                raise error
        if over and self._metrics is not None:
            self._metrics.fair_share.labels("lowered").inc()
        return Placement(message_priority(priority, over), over)
