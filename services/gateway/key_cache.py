"""API key checks: format first, then an in-process cache in front of one Redis call.

Concurrent misses for one key share a single lookup: a burst of new callers
on a key (or everyone at once when its entry expires) is one Redis call, not
one each.

The cache is trusted only while this process is subscribed to the
invalidation channel: every change to a key or bot is published there, so a
disable or revoke reaches every gateway within milliseconds. When the
subscription is down -- Redis unreachable or frozen -- the cache is dropped and
every request goes to Redis, which then fails: fail closed, never serve a key
that cannot be checked.

Well-formed keys that Redis does not know are remembered apart, in a smaller
cache with a shorter life: a flood of invented keys costs one Redis call each
at most once per ``unknown_ttl_s``, and cannot push real keys out of theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.metrics import FAILED, HIT, JOINED, MALFORMED, MISS, GatewayMetrics
from shared import keys
from shared.clock import now_ms
from shared.errors import (
    ApiKeyDisabled,
    ApiKeyExpired,
    BackendUnavailable,
    BotNotFound,
    InvalidApiKey,
)
from shared.records import Bot, KeyRecord
from shared.registry import Registry
from shared.tasks import idle

log = structlog.get_logger("botline.gateway.keys")

# Idle pub/sub connections are pinged this often; two missed pongs drop the cache.
_PING_EVERY_S = 1.0
_SILENCE_LIMIT_S = 3.0


def _uncounted(result: str) -> None:
    pass


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None
    bot: Bot | None
    until: float


_V = TypeVar("_V")


def _put(cache: dict[str, _V], key: str, value: _V, limit: int) -> None:
    """Insert, evicting the oldest entry (dicts keep insertion order) when full."""
    cache.pop(key, None)
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


class KeyCache:
    """Resolves API keys to their record and bot."""

    def __init__(
        self,
        registry: Registry,
        *,
        timeout_s: float,
        ttl_s: float,
        max_entries: int,
        unknown_ttl_s: float = 5.0,
        max_unknown: int = 10_000,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._registry = registry
        self._count = metrics.key_lookup if metrics is not None else _uncounted
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._unknown_ttl_s = unknown_ttl_s
        self._max_unknown = max_unknown
        self._entries: dict[str, _Entry] = {}
        # Key hashes Redis does not know, until when; kept apart from real keys.
        self._unknown: dict[str, float] = {}
        # Lookups under way, by key hash, shared by the requests that missed.
        self._fetching: dict[str, tuple[int, asyncio.Task[_Entry]]] = {}
        # Bumped by every invalidation; a lookup that raced one is not cached.
        self._generation = 0
        # Set at the next bump, then replaced: what wait_invalidated() awaits.
        self._bumped = asyncio.Event()
        # Set while the invalidation channel is followed (and entries are trusted).
        self._online = asyncio.Event()
        # Told every invalidation heard ("*" when anything may have changed).
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener`` with every invalidation message heard, and ``"*"`` on
        resubscribing (what changed meanwhile is unknown)."""
        self._listeners.append(listener)

    def _tell(self, message: str) -> None:
        for listener in self._listeners:
            listener(message)

    @property
    def generation(self) -> int:
        """Bumped by every invalidation: a lookup that straddled a change sees it move."""
        return self._generation

    @property
    def online(self) -> bool:
        """Following the invalidation channel: cached entries are used."""
        return self._online.is_set()

    async def wait_online(self) -> None:
        """Until the cache follows the invalidation channel."""
        await self._online.wait()

    def next_invalidation(self) -> asyncio.Event:
        """An event set at the next invalidation heard (or the cache going on- or offline).

        Take it before the change whose invalidation you wait for.
        """
        return self._bumped

    def _bump(self) -> None:
        self._generation += 1
        self._bumped.set()
        self._bumped = asyncio.Event()

    async def resolve(self, key: str | None) -> tuple[KeyRecord, Bot]:
        """The key's record and bot, or the error the caller must see."""
        if not key:
            self._count(MALFORMED)
            raise InvalidApiKey("missing API key: send 'Authorization: Bearer <key>'")
        if not keys.is_well_formed(key):
            self._count(MALFORMED)
            raise InvalidApiKey("malformed API key")
        key_hash = keys.hash_key(key)
        now = time.monotonic()
        entry = self._cached(key_hash, now)
        if entry is None:
            entry = await self._shared_fetch(key_hash, now)
        else:
            self._count(HIT)
        record, bot = entry.record, entry.bot
        if record is None:
            raise InvalidApiKey("unknown API key")
        if record.disabled:
            raise ApiKeyDisabled("this API key is disabled")
        wall = now_ms()
        if record.expired(wall):
            raise ApiKeyExpired("this API key has expired")
        if bot is None:
            raise BotNotFound("the bot of this API key no longer exists")
        return record, bot

    def _cached(self, key_hash: str, now: float) -> _Entry | None:
        if not self.online:
            return None
        entry = self._entries.get(key_hash)
        if entry is not None and entry.until > now:
            return entry
        unknown_until = self._unknown.get(key_hash)
        if unknown_until is not None and unknown_until > now:
            return _Entry(None, None, unknown_until)
        return None

    @property
    def sizes(self) -> tuple[int, int]:
        """Entries cached: (real keys, unknown keys)."""
        return len(self._entries), len(self._unknown)

    async def _shared_fetch(self, key_hash: str, now: float) -> _Entry:
        # A lookup started before the last invalidation may have read what it
        # invalidated: only one started since then is joined.
        generation = self._generation
        under_way = self._fetching.get(key_hash)
        if under_way is not None and under_way[0] == generation:
            fetch = under_way[1]
            self._count(JOINED)
        else:
            self._count(MISS)
            fetch = asyncio.create_task(self._fetch(key_hash, now, generation))
            self._fetching[key_hash] = (generation, fetch)

            def done(task: asyncio.Task[_Entry]) -> None:
                if self._fetching.get(key_hash, (0, None))[1] is task:
                    del self._fetching[key_hash]
                if not task.cancelled():
                    task.exception()  # retrieved, even if every caller left

            fetch.add_done_callback(done)
        # Shielded: a caller that goes away must not cancel the others' lookup.
        return await asyncio.shield(fetch)

    async def _fetch(self, key_hash: str, now: float, generation: int) -> _Entry:
        try:
            async with asyncio.timeout(self._timeout_s):
                record, bot = await self._registry.lookup(key_hash)
        except (RedisError, OSError, TimeoutError) as exc:
            self._count(FAILED)
            raise BackendUnavailable("cannot check API keys right now") from exc
        if record is None:
            until = now + self._unknown_ttl_s
            if self.online and generation == self._generation:
                _put(self._unknown, key_hash, until, self._max_unknown)
            return _Entry(None, None, until)
        entry = _Entry(record, bot, now + self._ttl_s)
        if self.online and generation == self._generation:
            self._unknown.pop(key_hash, None)
            _put(self._entries, key_hash, entry, self._max_entries)
        return entry

    def _invalidate(self, message: str) -> None:
        self._bump()
        kind, _, ident = message.partition(":")
        if kind == "key":
            self._entries.pop(ident, None)
            self._unknown.pop(ident, None)  # a key just created
        elif kind == "bot":
            stale = [h for h, e in self._entries.items() if e.record and e.record.bot_id == ident]
            for key_hash in stale:
                del self._entries[key_hash]
        else:
            self._entries.clear()
            self._unknown.clear()

    def _go_offline(self) -> None:
        self._online.clear()
        self._bump()
        self._entries.clear()
        self._unknown.clear()

    async def listen(self, redis: Redis, channel: str) -> None:
        """Follow the invalidation channel forever, reconnecting; run as a task."""
        backoff = 0.1
        while True:
            try:
                await self._follow(redis, channel)
            except asyncio.CancelledError:
                self._go_offline()
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self.online:
                    log.warning("keys.cache_offline", error=type(exc).__name__)
                self._go_offline()
            await idle(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _follow(self, redis: Redis, channel: str) -> None:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            heard = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=_PING_EVERY_S)
                now = time.monotonic()
                if message is None:
                    if now - heard > _SILENCE_LIMIT_S:
                        raise TimeoutError("invalidation channel went silent")
                    await pubsub.ping()
                    continue
                heard = now
                kind = message["type"]
                if kind == "subscribe":
                    # Whatever changed while unsubscribed is unknown: start empty.
                    self._entries.clear()
                    self._unknown.clear()
                    self._bump()
                    self._online.set()
                    log.info("keys.cache_online")
                    self._tell("*")
                elif kind == "message":
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    self._invalidate(text)
                    self._tell(text)
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
