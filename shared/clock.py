"""Wall-clock time as every record and message carries it."""

from __future__ import annotations

import time


def now_ms() -> int:
    """The current time, epoch milliseconds."""
    return time.time_ns() // 1_000_000
