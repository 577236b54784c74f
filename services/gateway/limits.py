"""Per-key limits: requests per minute, tokens per minute, requests in flight.

Enforced across every gateway process atomically, in one Redis call per
request (a Lua script), and only for keys that have limits.

- Requests per minute: GCRA (the "generic cell rate algorithm"), equivalent
  to a sliding window: a fresh key may burst to its limit, then gets one more
  request every ``60 s / rpm``. A fixed window would let twice the rate
  through around a window's edge; this never does.
- Tokens per minute: the same, counted in tokens. Admission reserves the
  request's estimate (its prompt's estimate plus its ``max_tokens`` as capped
  by the bot; at most the whole budget) and admits it only if the reservation
  fits in what is left; the end settles the reservation to the real usage
  (prompt + completion), giving back what was not used. So concurrent
  requests cannot spend more than the budget: the overshoot is what one
  request's real usage exceeds its estimate by. A key over its budget is
  refused until it has paid it back.
- Concurrency: leases in a sorted set, scored by their expiry. A request's
  lease is released when it ends or its caller goes away; the gateway renews
  its leases while requests run, so those of a gateway that died expire
  after ``lease_ttl_s``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.metrics import GatewayMetrics
from shared.errors import BackendUnavailable, RateLimited
from shared.names import Names
from shared.records import Limits
from shared.tasks import TaskSet, idle

log = structlog.get_logger("botline.gateway.limits")

# The window of both per-minute limits, passed to the scripts.
_WINDOW_MS = 60_000

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[6])
local rpm_left, rpm_reset, tpm_left, tpm_reset, new_rpm_tat, new_tpm_tat = -1, 0, -1, 0, 0, 0
if rpm > 0 then
  local interval = window / rpm
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
  new_rpm_tat = tat + interval
  if new_rpm_tat - now > window then
    return {0, 'requests', math.ceil(new_rpm_tat - window - now), 0, math.ceil(tat - now), -1, 0}
  end
  rpm_left = math.floor((window - (new_rpm_tat - now)) / interval)
  rpm_reset = math.ceil(new_rpm_tat - now)
end
if tpm > 0 then
  -- The request's reservation must fit in what is left of the budget.
  local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or now), now)
  new_tpm_tat = tat + tonumber(ARGV[7]) * window / tpm
  if new_tpm_tat - now > window then
    local left = math.max(0, math.floor(tpm * (window - (tat - now)) / window))
    return {0, 'tokens', math.ceil(new_tpm_tat - window - now) + 1, rpm_left, rpm_reset,
            left, math.ceil(tat - now)}
  end
  tpm_left = math.max(0, math.floor(tpm * (window - (new_tpm_tat - now)) / window))
  tpm_reset = math.ceil(new_tpm_tat - now)
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then
    return {0, 'concurrency', 1000, rpm_left, rpm_reset, tpm_left, tpm_reset}
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]) * 2)
end
if rpm > 0 then
  redis.call('SET', KEYS[1], tostring(new_rpm_tat), 'PX', math.ceil(new_rpm_tat - now) + 1000)
end
if tpm > 0 then
  redis.call('SET', KEYS[2], tostring(new_tpm_tat), 'PX', math.ceil(new_tpm_tat - now) + 1000)
end
return {1, '', 0, rpm_left, rpm_reset, tpm_left, tpm_reset}
"""

_SETTLE = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, tokens, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
-- Charge the real usage in place of the reservation: more, or some back.
local owed = tokens - tonumber(ARGV[5])
if tpm > 0 and owed ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- A budget already whole has nothing to give back.
  local tat = math.max(math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
                       + owed * window / tpm, now)
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
return 1
"""


def duration(ms: int) -> str:
    """A reset time as OpenAI writes it: ``250ms``, ``6s``, ``1m30s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


@dataclass(slots=True)
class Grant:
    """An admitted request: what to release when it ends, and its rate-limit headers."""

    key_id: str
    limits: Limits
    lease: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    # Tokens reserved at admission, settled to the real usage at the end.
    reserved: int = 0


def _headers(limits: Limits, answer: list[int]) -> dict[str, str]:
    _, _, _, rpm_left, rpm_reset, tpm_left, tpm_reset = answer
    headers = {}
    if limits.rpm:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(rpm_left, 0))
        headers["x-ratelimit-reset-requests"] = duration(rpm_reset)
    if limits.tpm:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(tpm_left, 0))
        headers["x-ratelimit-reset-tokens"] = duration(tpm_reset)
    return headers


class Limiter:
    """Admits requests against their key's limits and settles them afterwards."""

    def __init__(
        self,
        redis: Redis,
        names: Names,
        *,
        timeout_s: float,
        lease_ttl_s: float,
        metrics: GatewayMetrics | None = None,
    ):
        self._names = names
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._lease_ms = int(lease_ttl_s * 1000)
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._redis = redis
        # key id -> lease ids of this process's requests in flight (renewed).
        self._leases: dict[str, set[str]] = {}
        self._tasks = TaskSet()

    def _keys(self, key_id: str) -> list[str]:
        n = self._names
        return [n.rate(key_id, "rpm"), n.rate(key_id, "tpm"), n.leases(key_id)]

    async def admit(self, key_id: str, limits: Limits, lease: str, estimate: int = 0) -> Grant:
        """Take a request against the key's limits, or raise :class:`RateLimited`.

        ``estimate`` is the request's tokens at most (prompt estimate plus
        ``max_tokens``); with a tokens-per-minute limit it is reserved, up to
        the whole budget, until :meth:`settle` charges the real usage.
        """
        if not limits.any:
            return Grant(key_id, limits)
        reserved = min(max(estimate, 1), limits.tpm) if limits.tpm else 0
        args: list[str | int] = [
            limits.rpm or 0,
            limits.tpm or 0,
            limits.concurrency or 0,
            lease,
            self._lease_ms,
            _WINDOW_MS,
            reserved,
        ]
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._admit(keys=self._keys(key_id), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable("cannot check rate limits right now") from exc
        answer = [int(x) if not isinstance(x, bytes) else 0 for x in raw]
        reason = raw[1].decode() if isinstance(raw[1], bytes) else str(raw[1])
        headers = _headers(limits, answer)
        if not answer[0]:
            if self._metrics is not None:
                limit = {"requests": "rpm", "tokens": "tpm"}.get(reason, "concurrency")
                self._metrics.limit_refusals.labels(limit).inc()
            what = {"requests": "requests per minute", "tokens": "tokens per minute"}.get(
                reason, "concurrent requests"
            )
            raise RateLimited(f"rate limit reached for {what}", answer[2], headers)
        grant = Grant(key_id, limits, lease if limits.concurrency else "", headers, reserved)
        if grant.lease:
            self._leases.setdefault(key_id, set()).add(grant.lease)
        return grant

    def settle(self, grant: Grant, tokens: int) -> None:
        """Release the lease and charge the real tokens in place of the reservation.

        Returns at once (safe while cancelled).
        """
        if grant.lease:
            held = self._leases.get(grant.key_id)
            if held is not None:
                held.discard(grant.lease)
                if not held:
                    del self._leases[grant.key_id]
        if not (grant.lease or (grant.limits.tpm and tokens != grant.reserved)):
            return
        self._tasks.spawn(self._send_settle(grant, tokens))

    async def _send_settle(self, grant: Grant, tokens: int) -> None:
        try:
            async with asyncio.timeout(self._timeout_s * 3):
                await self._settle(
                    keys=self._keys(grant.key_id)[1:],
                    args=[grant.limits.tpm or 0, tokens, grant.lease, _WINDOW_MS, grant.reserved],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            # The lease expires by itself; the reservation stays charged.
            log.warning("limits.settle_failed", error=type(exc).__name__)

    async def renew_leases(self) -> None:
        """Keep this process's leases alive while their requests run; run as a task."""
        while True:
            await idle(self._lease_ms / 3000)
            if not self._leases:
                continue
            try:
                async with asyncio.timeout(self._timeout_s):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        t = await self._redis.time()
                        expiry = t[0] * 1000 + t[1] // 1000 + self._lease_ms
                        for key_id, leases in self._leases.items():
                            name = self._names.leases(key_id)
                            pipe.zadd(name, dict.fromkeys(leases, expiry), xx=True)
                            # The set's own TTL too: set only at admission, it
                            # dropped every lease of a request past 2 x the TTL.
                            pipe.pexpire(name, self._lease_ms * 2)
                        await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("limits.renew_failed", error=type(exc).__name__)

    async def close(self) -> None:
        """Let pending settlements finish."""
        await self._tasks.close()
