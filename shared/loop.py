"""The event loop the services run on: uvloop where it is installed.

uvloop's transport and timer code runs HTTP and AMQP I/O measurably faster
than asyncio's own loop (see docs/performance.md); everything works the same
without it.
"""

from __future__ import annotations

import asyncio
import importlib


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's if available, else asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
