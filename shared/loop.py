"""The event loop the services run on (uvloop where it is installed), and the
garbage collector's settings once a service has started.

uvloop's transport and timer code runs HTTP and AMQP I/O measurably faster
than asyncio's own loop (see docs/performance.md); everything works the same
without it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
from collections.abc import Callable

import structlog

log = structlog.get_logger("botline.runtime")


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


def settle_heap(gen0_threshold: int) -> None:
    """Once a service has started: its start-up objects out of every later
    collection, and the youngest generation collected less often.

    With Python's defaults a service under load spent about a tenth of its CPU
    in the cyclic garbage collector (docs/performance.md, ninth pass). Most of
    a request's objects are freed by their reference counts, never by the
    collector; but those alive while a collection runs (the requests in
    flight) are moved to an older generation, and once enough have been moved
    a full collection walks every object the process holds: about 77,000
    after start-up, more under load, and 40-50 ms each with the event loop
    stopped, every two seconds or so at 1,000 answers a second.
    :func:`gc.freeze` after a last full collection puts what start-up left in
    a generation of its own that no collection walks again; a first-generation
    threshold of ``gen0_threshold`` container objects (Python's is 700) runs a
    collection when that many more have been allocated than freed, which a
    request's own objects rarely are. Reference cycles are still collected,
    later. ``0`` leaves the collector as Python sets it.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info("gc.settled", frozen_objects=gc.get_freeze_count(), gen0_threshold=gen0_threshold)
