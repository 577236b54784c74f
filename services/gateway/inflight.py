"""Requests in flight, by key: a revoke, a disable or an expiry ends them.

Every chat request holds a :class:`Ticket` for its key while it runs
(:func:`services.gateway.admission.chat_session` takes it). When the key
cache hears that a key or its bot changed (the invalidation channel every
gateway follows), :class:`InFlight` reads the key again from Redis, past the
cache, and fails the key's tickets if it is gone, disabled or expired; a
key's expiry is a timer on each of its tickets. A failed ticket interrupts
its :class:`~services.gateway.chat_run.ChatRun`: a stream ends with one error
event, a whole answer with the error's status, and leaving the run cancels
the job on the workers, which stops the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from redis.exceptions import RedisError

from services.gateway.chat_run import ChatRun
from shared.clock import now_ms
from shared.errors import ApiKeyDisabled, ApiKeyExpired, ApiKeyRevoked, BotlineError, BotNotFound
from shared.records import KeyRecord
from shared.registry import Registry
from shared.tasks import TaskSet

log = structlog.get_logger("botline.gateway.inflight")


def _expired() -> ApiKeyExpired:
    return ApiKeyExpired("this API key has expired")


class Ticket:
    """One chat request in flight under a key; :meth:`fail` ends it."""

    def __init__(self, key_hash: str, record: KeyRecord) -> None:
        self.key_hash = key_hash
        self.bot_id = record.bot_id
        # Why the request must end, once it must.
        self.error: BotlineError | None = None
        self._run: ChatRun | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.expire_at(record.expires_at)

    def expire_at(self, expires_at: int | None) -> None:
        """Fail at ``expires_at`` (epoch ms; None: never), replacing any earlier expiry."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is not None and self.error is None:
            delay_s = max(expires_at - now_ms(), 0) / 1000
            self._expiry = asyncio.get_running_loop().call_later(
                delay_s, lambda: self.fail(_expired())
            )

    def attach(self, run: ChatRun) -> None:
        """The request's run, which :meth:`fail` interrupts (at once, if it already failed)."""
        self._run = run
        if self.error is not None:
            run.interrupt(self.error)

    def fail(self, error: BotlineError) -> None:
        """End the request with ``error`` (the first error only)."""
        if self.error is not None:
            return
        self.error = error
        log.info("request.interrupted", code=error.code)
        if self._run is not None:
            self._run.interrupt(error)

    def close(self) -> None:
        """The request ended: stop its timer."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class InFlight:
    """This gateway's requests in flight, by the hash of their key."""

    def __init__(self, registry: Registry, *, timeout_s: float) -> None:
        self._registry = registry
        self._timeout_s = timeout_s
        self._by_hash: dict[str, set[Ticket]] = {}
        self._tasks = TaskSet()

    @contextmanager
    def track(self, key_hash: str, record: KeyRecord) -> Iterator[Ticket]:
        """Hold a ticket for a request of this key while the block runs."""
        ticket = Ticket(key_hash, record)
        tickets = self._by_hash.setdefault(key_hash, set())
        tickets.add(ticket)
        try:
            yield ticket
        finally:
            ticket.close()
            tickets.discard(ticket)
            if not tickets and self._by_hash.get(key_hash) is tickets:
                del self._by_hash[key_hash]

    def count(self, key_hash: str) -> int:
        """This key's requests in flight here."""
        return len(self._by_hash.get(key_hash, ()))

    @property
    def active_keys(self) -> int:
        """Keys with requests in flight here."""
        return len(self._by_hash)

    def changed(self, message: str) -> None:
        """An invalidation heard by the key cache (``key:<hash>``, ``bot:<id>``, or anything
        else: everything may have changed); checks the keys of requests it concerns."""
        kind, _, ident = message.partition(":")
        if kind == "key":
            hashes = [ident] if ident in self._by_hash else []
        elif kind == "bot":
            hashes = [h for h, ts in self._by_hash.items() if any(t.bot_id == ident for t in ts)]
        else:
            hashes = list(self._by_hash)
        for key_hash in hashes:
            self.recheck(key_hash)

    def recheck(self, key_hash: str) -> None:
        """Read a key again and end its requests if it may no longer be used; returns at once."""
        self._tasks.spawn(self._recheck(key_hash))

    async def _recheck(self, key_hash: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                record, bot = await self._registry.lookup(key_hash)
        except (RedisError, OSError, TimeoutError) as exc:
            # Requests already admitted keep running; new ones are checked (fail closed).
            log.warning("inflight.recheck_failed", error=type(exc).__name__)
            return
        error: BotlineError | None = None
        if record is None:
            error = ApiKeyRevoked("this API key was revoked")
        elif record.disabled:
            error = ApiKeyDisabled("this API key is disabled")
        elif record.expired(now_ms()):
            error = _expired()
        elif bot is None:
            error = BotNotFound("the bot of this API key no longer exists")
        for ticket in list(self._by_hash.get(key_hash, ())):
            if error is not None:
                ticket.fail(error)
            elif record is not None:
                ticket.expire_at(record.expires_at)  # its expiry may have moved

    async def close(self) -> None:
        """Let pending checks finish."""
        await self._tasks.close()
