"""Provider capacity shared by the fleet: one budget per endpoint, taken atomically in Redis.

A provider's ``rpm``, ``tpm`` and in-flight limits belong to its account,
not to a process, so every worker takes from one budget before calling
(three sorted sets per endpoint, ``Names.endpoint_budget``, one Lua call):

- ``rpm``: a log of call times. A call is given the earliest time at which
  no window of ``budget_window_s`` (+ margin) would hold more than ``rpm``
  calls -- now, or a *reserved* time later on. A reservation is a place in
  line: the worker sleeps until then and calls without asking again, so
  waiting jobs go first come, first served, with no thundering herd;
- ``tpm``: a log of token reservations (prompt estimate + ``max_tokens``),
  corrected to the real usage once the answer is in. Over budget, the
  caller is told when enough will have expired, and asks again then;
- ``inflight``: leases, one per call, expiring at the job's deadline (so a
  dead worker's leases lapse); over the limit the caller asks again shortly.

A reservation further away than the caller may wait is not made: the script
answers how long it would be, and the router refuses the job at once rather
than let it time out (or tries the bot's next endpoint).

Redis down or slow: the call goes ahead without budget (fail open), and a
429 from the provider is then handled like any other (pause, next endpoint).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.worker.settings import EndpointConfig
from shared.names import Names

log = structlog.get_logger("botline.worker.budget")

# In-flight leases give no time at which one frees: ask again after this.
_INFLIGHT_POLL_MS = 50

_TAKE = """
local rpm_key, tpm_key, fly_key = KEYS[1], KEYS[2], KEYS[3]
local window, rpm, tpm, max_fly = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local lease, tokens, lease_ms, max_wait = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]),
  tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if max_fly > 0 then
  redis.call('ZREMRANGEBYSCORE', fly_key, '-inf', now)
  if redis.call('ZCARD', fly_key) >= max_fly then return {0, POLL, 'max_in_flight'} end
end
local used = 0
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', tpm_key, '-inf', now - window)
  local all = redis.call('ZRANGE', tpm_key, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do used = used + tonumber(string.match(all[i], ':(%d+)$')) end
  -- A job bigger than the whole budget still goes, alone.
  if used > 0 and used + tokens > tpm then
    local need, freed = used + tokens - tpm, 0
    for i = 1, #all, 2 do
      freed = freed + tonumber(string.match(all[i], ':(%d+)$'))
      if freed >= need then return {0, tonumber(all[i + 1]) + window + 1 - now, 'tpm'} end
    end
  end
end
local at = now
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - window)
  local n = redis.call('ZCARD', rpm_key)
  if n >= rpm then
    -- The call rpm places back must leave the window first.
    local back = redis.call('ZRANGE', rpm_key, n - rpm, n - rpm, 'WITHSCORES')
    at = math.max(now, tonumber(back[2]) + window + 1)
  end
  if at - now > max_wait then return {0, at - now, 'rpm'} end
  redis.call('ZADD', rpm_key, at, lease)
  redis.call('PEXPIRE', rpm_key, at - now + window + 1000)
end
if tpm > 0 then
  redis.call('ZADD', tpm_key, at, lease .. ':' .. tokens)
  redis.call('PEXPIRE', tpm_key, at - now + window + 1000)
end
if max_fly > 0 then
  redis.call('ZADD', fly_key, now + lease_ms, lease)
  redis.call('PEXPIRE', fly_key, lease_ms + 1000)
end
return {1, at - now, ''}
""".replace("POLL", str(_INFLIGHT_POLL_MS))

# ARGV: lease, reserved tokens, used tokens (-1: leave them), in-flight key too.
_SETTLE = """
local lease, reserved, used = ARGV[1], ARGV[2], tonumber(ARGV[3])
if KEYS[2] ~= '' then redis.call('ZREM', KEYS[2], lease) end
if used >= 0 and KEYS[1] ~= '' then
  local at = redis.call('ZSCORE', KEYS[1], lease .. ':' .. reserved)
  if at then
    redis.call('ZREM', KEYS[1], lease .. ':' .. reserved)
    redis.call('ZADD', KEYS[1], at, lease .. ':' .. used)
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """Capacity taken: call after ``delay_s`` (a reserved place in line), then settle."""

    endpoint: str
    lease: str
    tokens: int
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """No capacity within what the caller may wait; there would be in ``wait_s``."""

    endpoint: str
    wait_s: float
    reason: str


class Budget:
    """Takes and gives back fleet-wide capacity of declared endpoints."""

    def __init__(
        self,
        redis: Redis,
        names: Names,
        *,
        window_s: float,
        margin_s: float,
        timeout_s: float,
    ) -> None:
        self._names = names
        self._take = redis.register_script(_TAKE)
        self._settle = redis.register_script(_SETTLE)
        self._window_ms = int((window_s + margin_s) * 1000)
        self._timeout_s = timeout_s
        # For the metrics: reservations that had to wait, and refusals.
        self.waits = 0
        self.waited_s = 0.0
        self.refusals = 0
        self.redis_errors = 0

    def _keys(self, name: str) -> list[str]:
        return [self._names.endpoint_budget(name, d) for d in ("rpm", "tpm", "inflight")]

    async def take(
        self, name: str, config: EndpointConfig, *, tokens: int, lease_s: float, max_wait_s: float
    ) -> Grant | Refusal:
        """Capacity for one call, now or reserved within ``max_wait_s``."""
        lease = secrets.token_hex(8)
        args: list[str | int] = [
            self._window_ms,
            config.rpm or 0,
            config.tpm or 0,
            config.max_in_flight or 0,
            lease,
            tokens,
            max(1, int(lease_s * 1000)),
            max(0, int(max_wait_s * 1000)),
        ]
        try:
            async with asyncio.timeout(self._timeout_s):
                ok, wait_ms, reason = await self._take(keys=self._keys(name), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.redis_errors += 1
            log.warning("budget.unavailable", endpoint=name, error=type(exc).__name__)
            return Grant(name, lease, tokens)  # fail open
        if not ok:
            self.refusals += 1
            why = reason.decode() if isinstance(reason, bytes) else str(reason)
            return Refusal(name, int(wait_ms) / 1000, why)
        if wait_ms:
            self.waits += 1
            self.waited_s += int(wait_ms) / 1000
        return Grant(name, lease, tokens, int(wait_ms) / 1000)

    async def settle(self, grant: Grant, config: EndpointConfig, used_tokens: int | None) -> None:
        """The call is over: free its in-flight lease, count its real tokens."""
        keys = self._keys(grant.endpoint)
        tpm = keys[1] if config.tpm else ""
        fly = keys[2] if config.max_in_flight else ""
        if not tpm and not fly:
            return
        used = -1 if used_tokens is None else used_tokens
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._settle(keys=[tpm, fly], args=[grant.lease, grant.tokens, used])
        except (RedisError, OSError, TimeoutError) as exc:
            # The lease lapses at its expiry; the token estimate stays.
            self.redis_errors += 1
            log.warning("budget.unavailable", endpoint=grant.endpoint, error=type(exc).__name__)
