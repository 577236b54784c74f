"""This gateway's jobs on the fleet's slots, and the lowered jobs held back for the reserve.

The fair share (:mod:`services.gateway.fair_share`) keeps a few of the
fleet's job slots free for keys within their share: a job of a key over its
share (a *lowered* job) is published only while this gateway's jobs in
flight leave the reserve free (``taken < limit``, the limit being the
fleet's capacity less the reserve). Otherwise it is held here, not in the
queue, and let go when one of this gateway's jobs ends: highest message
priority first, then first come first served. A job within its key's share
is never held: it takes a slot at once, the reserve's included.

With no limit (no reserve, or the capacity not known yet) nothing is ever
held, and this only counts.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Slots:
    """Counts this gateway's jobs in flight; holds lowered jobs while only the reserve is free."""

    def __init__(self) -> None:
        # This gateway's jobs published (or about to be) whose end has not come.
        self.taken = 0
        # Lowered jobs wait while ``taken`` is at least this; None: they never wait.
        self.limit: int | None = None
        # The held jobs, the best first: (-message priority, arrival, future).
        self._held: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()
        # Held jobs still waiting (the heap may keep some that left, until popped).
        self.held = 0

    def set_limit(self, limit: int | None) -> None:
        """A new limit for lowered jobs (the fleet's capacity changed); lets go whom it can."""
        self.limit = limit
        self._let_go()

    def take(self, lowered: bool, priority: int) -> asyncio.Future[None] | None:
        """A slot for a job about to be published.

        None: it has one now. Otherwise the job is held: the future is done
        once it was given a slot; a job that stops waiting calls :meth:`leave`.
        """
        if not lowered or self.limit is None or (not self.held and self.taken < self.limit):
            self.taken += 1
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._held, (-priority, next(self._arrival), waiter))
        self.held += 1
        return waiter

    def leave(self, waiter: asyncio.Future[None]) -> bool:
        """A held job stops waiting (let go, timed out, or its caller left).

        True if it had been given a slot (it must :meth:`give` it back once
        done with it); False if it had not, and now never will be.
        """
        if waiter.done() and not waiter.cancelled():
            return True
        if not waiter.done():
            waiter.cancel()
            self.held -= 1
        return False

    def give(self) -> None:
        """A job ended (or was never published): its slot is free again."""
        self.taken -= 1
        self._let_go()

    def _let_go(self) -> None:
        while self._held and (self.limit is None or self.taken < self.limit):
            _, _, waiter = heapq.heappop(self._held)
            if waiter.done():
                continue  # it left
            self.held -= 1
            self.taken += 1
            waiter.set_result(None)
