"""Repeated authentication failures from one client address are slowed down.

Counted per address in this gateway process only (not shared through Redis):
with N gateways behind a balancer an address gets up to N times the threshold.
The address is the TCP peer (``request.remote``); behind a proxy that is the
proxy's, and ``X-Forwarded-For`` is not read (a caller could forge it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from shared.errors import RateLimited

_WINDOW_S = 60.0


class AuthFailures:
    """Failures per address in fixed one-minute windows; past the threshold, a 429."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_minute = per_minute
        self._max_addresses = max_addresses
        self._clock = clock
        # Address -> (start of its window, failures in it); oldest first.
        self._windows: dict[str, tuple[float, int]] = {}

    def check(self, address: str) -> None:
        """Raise the 429 if ``address`` failed too often this minute."""
        if not self._per_minute:
            return
        window = self._windows.get(address)
        if window is None:
            return
        started, failures = window
        left = started + _WINDOW_S - self._clock()
        if left <= 0:
            del self._windows[address]
        elif failures >= self._per_minute:
            raise RateLimited(
                "too many failed authentications from this address; retry later",
                retry_after_ms=math.ceil(left * 1000),
                headers={},
            )

    def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        if not self._per_minute:
            return
        now = self._clock()
        started, failures = self._windows.pop(address, (now, 0))
        if now - started >= _WINDOW_S:
            started, failures = now, 0
        if len(self._windows) >= self._max_addresses:
            # The oldest window goes first: dicts keep insertion order.
            self._windows.pop(next(iter(self._windows)))
        self._windows[address] = (started, failures + 1)
