"""Loops and shutdowns that survive a cancellation lost inside a library (shared/tasks.py).

The gateway's shutdown once waited forever on its fair-share loop: a Redis
call it was in turned the cancellation into an error of its own, the loop
took it for an outage and slept on. ``converting`` stands for such a call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from shared.tasks import TaskSet, idle, stop

# Set when a call of ``converting`` is under way: a test waits on it, not on a sleep
# (a new one per wait, made on the test's own event loop).
_in_call: list[asyncio.Event] = []


async def converting() -> None:
    """A library call that turns a cancellation into its own error."""
    for event in _in_call:
        event.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise TimeoutError("timed out") from None


async def in_call() -> None:
    """Until a task is inside ``converting``."""
    event = asyncio.Event()
    _in_call[:] = [event]
    await asyncio.wait_for(event.wait(), timeout=2.0)


async def retrying(pause: Callable[[float], Awaitable[None]], done: asyncio.Event) -> None:
    """A loop that tries again after an error, as the gateway's background loops do."""
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await converting()
        await pause(0.01)


async def test_a_plain_sleep_loses_the_cancellation() -> None:
    # What went wrong: cancelled, the loop goes on.
    done = asyncio.Event()
    task = asyncio.create_task(retrying(asyncio.sleep, done))
    await in_call()
    task.cancel()
    finished, _ = await asyncio.wait({task}, timeout=0.3)
    assert not finished
    assert task.cancelling() == 1  # asked, and lost
    done.set()  # (how this test stops it)
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    assert task.done()


async def test_idle_stops_a_loop_whose_cancellation_was_lost() -> None:
    task = asyncio.create_task(retrying(idle, asyncio.Event()))
    await in_call()
    task.cancel()
    finished, _ = await asyncio.wait({task}, timeout=1.0)
    assert finished
    assert task.cancelled()


async def test_idle_sleeps_when_nobody_asked_to_stop() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await idle(0.05)
    assert loop.time() - started >= 0.05


async def stubborn(ends: list[str]) -> None:
    """Loses its first cancellation (as in a library), then sleeps on: the second ends it."""
    with contextlib.suppress(TimeoutError):
        await converting()
    try:
        await asyncio.sleep(3600)
    finally:
        ends.append("ended")


async def test_stop_cancels_again_what_lost_its_cancellation() -> None:
    ends: list[str] = []
    tasks = [asyncio.create_task(stubborn(ends)), asyncio.create_task(asyncio.sleep(3600))]
    await in_call()
    await asyncio.wait_for(stop(tasks, every_s=0.05), timeout=2.0)
    assert ends == ["ended"]
    assert all(task.done() for task in tasks)


async def test_a_task_set_closes_despite_a_lost_cancellation() -> None:
    ends: list[str] = []
    tasks = TaskSet()
    tasks.spawn(stubborn(ends))
    await in_call()
    await asyncio.wait_for(tasks.close(grace_s=0.01), timeout=5.0)
    assert ends == ["ended"]


async def test_stop_reports_a_task_that_failed_without_raising() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop([task])  # its error is retrieved, not raised here
    assert isinstance(task.exception(), ValueError)
