"""Fire-and-forget work that still has an owner.

Some work must start where nothing may be awaited -- in the clean-up of a
request whose caller went away, say -- and must not be lost or left running
at shutdown. A :class:`TaskSet` starts it, keeps it, and on ``close`` gives
it a little time to finish before cancelling what is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Owns background tasks until they finish or the set is closed."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` now; returns at once."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace_s: float = 2.0) -> None:
        """Wait up to ``grace_s`` for the tasks, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
