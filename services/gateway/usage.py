"""Usage accounting: requests and tokens per key and per bot, plus keys' last use.

Counted once per request, by the gateway that answered it, however often
its job was retried. Counts gather in memory and go to Redis in one call a
second, so accounting adds no round trip to a request. A gateway that is
killed loses at most its last second of counts.

Exactly once: a flush whose reply never came (Redis frozen, a timeout) may
still be applied when Redis resumes, so a flush cannot simply be sent again.
Each batch of counts gets an id when it is first sent, and a Lua script
applies it only if its id was never seen (``SET NX`` with a TTL, in the same
script as the increments). A batch that failed is sent again as it was, with
the same id, before any newer counts, which wait in memory meanwhile.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass

import orjson
import structlog
from redis.exceptions import RedisError

from shared.registry import Registry
from shared.tasks import idle
from shared.wire import Usage

log = structlog.get_logger("botline.gateway.usage")

# A batch's id is remembered this long: far longer than a gateway keeps
# retrying one (it retries every flush, each second, until Redis answers).
_BATCH_TTL_MS = 24 * 3600 * 1000

# KEYS[1]: the batch's marker, KEYS[2..]: usage hashes; ARGV[1]: the marker's
# TTL, ARGV[2]: a JSON list of {field: increment}, one per hash.
_APPLY_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local counts = cjson.decode(ARGV[2])
for i, fields in ipairs(counts) do
  for field, amount in pairs(fields) do
    redis.call('HINCRBY', KEYS[i + 1], field, amount)
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class _Batch:
    """Counts sent (or to be sent) under one id."""

    batch_id: str
    counts: dict[str, dict[str, int]]


class UsageBook:
    """Pending usage counts of this gateway process."""

    def __init__(self, registry: Registry, *, timeout_s: float) -> None:
        self._registry = registry
        self._timeout_s = timeout_s
        self._pending: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # A batch that was sent but not confirmed: it may have been applied.
        self._unconfirmed: _Batch | None = None
        self._last_used: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._apply = registry.redis.register_script(_APPLY_ONCE)

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
            try:
                async with asyncio.timeout(self._timeout_s):
                    if self._unconfirmed is None and self._pending:
                        counts = {name: dict(fields) for name, fields in self._pending.items()}
                        self._pending = defaultdict(Counter)
                        self._unconfirmed = _Batch(secrets.token_hex(12), counts)
                    if self._unconfirmed is not None:
                        await self._send(self._unconfirmed)
                        self._unconfirmed = None
                    used, self._last_used = self._last_used, {}
                    if used:
                        try:
                            # Timestamps, not counts: writing them twice is harmless.
                            await self._registry.touch(used)
                        except BaseException:
                            for key_id, ms in used.items():
                                self._last_used.setdefault(key_id, ms)
                            raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("usage.flush_failed", error=type(exc).__name__)

    async def _send(self, batch: _Batch) -> None:
        names = list(batch.counts)
        await self._apply(
            keys=[self._registry.names.usage_batch(batch.batch_id), *names],
            args=[_BATCH_TTL_MS, orjson.dumps([batch.counts[name] for name in names])],
        )

    async def run(self, every_s: float = 1.0) -> None:
        """Flush every ``every_s`` seconds; run as a task."""
        while True:
            await idle(every_s)
            await self.flush()
