"""Fire-and-forget work that still has an owner.

Some work must start where nothing may be awaited -- in the clean-up of a
request whose caller went away, say -- and must not be lost or left running
at shutdown. A :class:`TaskSet` starts it, keeps it, and on ``close`` gives
it a little time to finish before cancelling what is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

import structlog

log = structlog.get_logger("botline.tasks")


def cancelling() -> bool:
    """Whether the running task was asked to stop.

    A cancellation that lands inside a library may come out as that
    library's own error (seen in the gateway: a Redis call during shutdown
    raised a TimeoutError-like error, the fair-share loop caught it as an
    outage and slept on, and the shutdown waited for it forever). The
    request is still counted on the task (``Task.cancelling()``), so a loop
    that catches errors to try again asks this before it does.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def idle(seconds: float) -> None:
    """``asyncio.sleep``, for a loop that tries again: raises ``CancelledError``
    at once if its task was asked to stop (see :func:`cancelling`)."""
    if cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


async def stop(tasks: Iterable[asyncio.Task[Any]], *, every_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until they are done.

    One still running ``every_s`` after its cancellation (it lost it in a
    library, as above) is logged and cancelled again, so a shutdown cannot
    hang on it.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
        if pending:
            log.warning("task.cancel_lost", tasks=sorted(task.get_name() for task in pending))
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: its end is known, and not logged as unseen


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
        await stop(self._tasks)
