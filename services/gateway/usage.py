"""Usage accounting: requests and tokens per key and per bot, plus keys' last use.

Counted once per request, by the gateway that answered it, however often
its job was retried. Counts gather in memory and go to Redis in one pipeline
a second, so accounting adds no round trip to a request. A gateway that is
killed loses at most its last second of counts.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

from redis.exceptions import RedisError

from shared.registry import Registry
from shared.wire import Usage


class UsageBook:
    """Pending usage counts of this gateway process."""

    def __init__(self, registry: Registry, *, timeout_s: float) -> None:
        self._registry = registry
        self._timeout_s = timeout_s
        self._pending: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._last_used: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def record(self, key_id: str, bot_id: str, usage: Usage | None) -> None:
        """Count one finished request (``usage`` None: no tokens are known)."""
        names = self._registry.names
        for name in (names.key_usage(key_id), names.bot_usage(bot_id)):
            counts = self._pending[name]
            counts["requests"] += 1
            if usage is not None:
                counts["prompt_tokens"] += usage.prompt_tokens
                counts["completion_tokens"] += usage.completion_tokens

    def used(self, key_id: str, at_ms: int) -> None:
        """Note a key's use (its ``last_used_at``)."""
        self._last_used[key_id] = at_ms

    async def flush(self) -> None:
        """Write what is pending now; on failure it stays pending for the next try."""
        async with self._lock:
            counts, self._pending = self._pending, defaultdict(Counter)
            used, self._last_used = self._last_used, {}
            try:
                async with asyncio.timeout(self._timeout_s):
                    if counts:
                        await self._registry.add_usage(counts)
                    if used:
                        await self._registry.touch(used)
            except (RedisError, OSError, TimeoutError):
                for name, fields in counts.items():
                    self._pending[name].update(fields)
                for key_id, ms in used.items():
                    self._last_used.setdefault(key_id, ms)

    async def run(self, every_s: float = 1.0) -> None:
        """Flush every ``every_s`` seconds; run as a task."""
        while True:
            await asyncio.sleep(every_s)
            await self.flush()
