"""The event loop the services run on: uvloop where it is installed.

uvloop's transport and timer code runs HTTP and AMQP I/O measurably faster
than asyncio's own loop (see docs/performance.md); everything works the same
without it.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's if available, else asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def watch_lag(record: Callable[[float], None], every_s: float = 0.5) -> None:
    """Measure, forever, how late a sleep of ``every_s`` wakes up, and ``record`` it.

    A loop busy with CPU work runs its timers late: this lag is what every
    task on the loop waits extra. Run as a task.
    """
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(every_s)
        record(max(loop.time() - asked - every_s, 0.0))
