"""Endpoint health shared by the fleet: failure counts, cooldowns, half-open probes, pauses.

One Redis hash per endpoint (``Names.endpoint_health``) holds:

- ``fails``/``win``: failures counted in the current window (started at ``win``);
- ``open_until``: set when ``cooldown_failures`` failures fell in one window.
  Until then every worker skips the endpoint; after it the endpoint is
  *half-open*: the first worker to look takes the probe (``probe_until``, a
  lease as long as the endpoint's timeout) and the others keep skipping it.
  The probe's success closes the endpoint, its failure opens it again;
- ``paused_until``: an upstream ``Retry-After`` (a 429), honoured by everyone.

Every change is one Lua script, so that two workers never both take the
probe nor both miss a threshold. Times are Redis's own clock (``TIME``), the
one clock the whole fleet shares.

Redis down or slow: the endpoint is treated as healthy (fail open). A
cooldown protects the provider and the callers' time; losing it for the
length of a Redis outage costs a few failed calls, whereas failing closed
would stop every bot.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.worker.settings import EndpointConfig
from shared.names import Names

log = structlog.get_logger("botline.worker.cooldowns")

_HEALTH = """
local h = KEYS[1]
local op = ARGV[1]
local threshold, window, cooldown, probe_ms = tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function num(field) return tonumber(redis.call('HGET', h, field) or '0') end
-- The record outlives a cooldown and its probe; idle endpoints are forgotten.
local function keep(ms)
  if redis.call('PTTL', h) < ms then redis.call('PEXPIRE', h, ms) end
end
local life = window + cooldown + probe_ms + 60000
if op == 'check' then
  local paused = num('paused_until')
  if paused > now then return {'paused', paused - now} end
  local open = num('open_until')
  if open == 0 then return {'closed', 0} end
  if open > now then return {'open', open - now} end
  local probe = num('probe_until')
  if probe > now then return {'probing', probe - now} end
  redis.call('HSET', h, 'probe_until', now + probe_ms)
  keep(life)
  return {'probe', 0}
elseif op == 'fail' then
  local open = num('open_until')
  if ARGV[6] == '1' then
    redis.call('HSET', h, 'open_until', now + cooldown, 'probe_until', 0, 'fails', 0)
    keep(life)
    return {'reopened', cooldown}
  end
  if open > 0 then return {'open', math.max(open - now, 0)} end
  local win = num('win')
  local fails = num('fails')
  if now - win > window then win, fails = now, 0 end
  fails = fails + 1
  if fails >= threshold then
    redis.call('HSET', h, 'open_until', now + cooldown, 'probe_until', 0, 'fails', 0, 'win', now)
    keep(life)
    return {'opened', cooldown}
  end
  redis.call('HSET', h, 'fails', fails, 'win', win)
  keep(life)
  return {'closed', fails}
elseif op == 'ok' then
  if ARGV[6] == '1' then
    redis.call('HDEL', h, 'open_until', 'probe_until', 'fails', 'win')
    return {'closed', 0}
  end
  return {'closed', 0}
elseif op == 'unprobe' then
  if ARGV[6] == '1' then redis.call('HSET', h, 'probe_until', 0) end
  return {'closed', 0}
elseif op == 'pause' then
  local ms = tonumber(ARGV[7])
  if num('paused_until') < now + ms then redis.call('HSET', h, 'paused_until', now + ms) end
  keep(ms + 1000)
  return {'paused', ms}
end
return redis.error_reply('unknown op')
"""


class Health(enum.Enum):
    """What a worker may do with an endpoint right now."""

    CLOSED = "closed"  # healthy: call it
    PROBE = "probe"  # half-open, and this caller holds the one probe
    OPEN = "open"  # cooling down: skip it
    PROBING = "probing"  # half-open, another worker is probing: skip it
    PAUSED = "paused"  # the provider said Retry-After: skip it


@dataclass(frozen=True, slots=True)
class Verdict:
    """A health check's answer: what to do, and for how long a skip holds."""

    health: Health
    wait_s: float = 0.0

    @property
    def usable(self) -> bool:
        """Whether the endpoint may be called now."""
        return self.health in (Health.CLOSED, Health.PROBE)


# How long a healthy verdict is trusted by the worker that heard it: another
# worker's cooldown reaches this one at most this late.
_FRESH_S = 0.25
_HEALTHY = Verdict(Health.CLOSED)


class Cooldowns:
    """The fleet's view of each endpoint's health, in Redis."""

    def __init__(self, redis: Redis, names: Names, timeout_s: float) -> None:
        self._names = names
        self._script = redis.register_script(_HEALTH)
        self._timeout_s = timeout_s
        # Opens and probes seen by this worker, for the metrics.
        self.opened = 0
        self.redis_errors = 0
        # The check in flight for each endpoint: jobs asking meanwhile share its
        # answer (None: it was cancelled, ask again).
        self._checking: dict[str, asyncio.Future[Verdict | None]] = {}
        # When each endpoint was last seen healthy: for _FRESH_S after that, jobs
        # call it without asking Redis (a call per job was most of the worker's
        # Redis traffic). A failure or pause heard here forgets it at once.
        self._healthy_at: dict[str, float] = {}

    async def _call(
        self, op: str, name: str, config: EndpointConfig, *, probe: bool = False, ms: int = 0
    ) -> tuple[str, int] | None:
        args: list[str | int] = [
            op,
            config.cooldown_failures,
            int(config.cooldown_window_s * 1000),
            int(config.cooldown_s * 1000),
            int(config.timeout_s * 1000),
            "1" if probe else "0",
            ms,
        ]
        try:
            async with asyncio.timeout(self._timeout_s):
                state, value = await self._script(
                    keys=[self._names.endpoint_health(name)], args=args
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.redis_errors += 1
            log.warning("endpoint.state_unavailable", endpoint=name, error=type(exc).__name__)
            return None
        return (state.decode() if isinstance(state, bytes) else str(state)), int(value)

    async def check(self, name: str, config: EndpointConfig) -> Verdict:
        """May the endpoint be called? Takes the probe when it is half-open and free.

        At most one check per endpoint is in flight in this worker: jobs that
        ask while one is on its way to Redis take its answer, as if they had
        asked a round trip sooner, instead of a Redis call each (a burst of
        jobs made one call per job). The probe is not shared: it belongs to
        the job whose check took it, and the others ask for themselves.
        """
        fresh = self.fresh(name)
        if fresh is not None:
            return fresh
        pending = self._checking.get(name)
        if pending is not None:
            shared = await asyncio.shield(pending)
            if shared is not None and shared.health is not Health.PROBE:
                return shared
            return await self._check(name, config)
        pending = asyncio.get_running_loop().create_future()
        self._checking[name] = pending
        verdict: Verdict | None = None
        try:
            verdict = await self._check(name, config)
            return verdict
        finally:
            del self._checking[name]
            pending.set_result(verdict)

    def fresh(self, name: str) -> Verdict | None:
        """Healthy, if this worker heard so within ``_FRESH_S``; None: ask (:meth:`check`)."""
        seen = self._healthy_at.get(name)
        if seen is not None and time.monotonic() - seen < _FRESH_S:
            return _HEALTHY
        return None

    async def _check(self, name: str, config: EndpointConfig) -> Verdict:
        found = await self._call("check", name, config)
        if found is None:
            return Verdict(Health.CLOSED)  # fail open
        state, ms = found
        verdict = Verdict(Health(state), ms / 1000)
        if verdict.health is Health.CLOSED:
            self._healthy_at[name] = time.monotonic()
        else:
            self._healthy_at.pop(name, None)
        return verdict

    async def failed(self, name: str, config: EndpointConfig, *, probe: bool) -> None:
        """Count a failure; the one that crosses the threshold opens the endpoint for everyone."""
        self._healthy_at.pop(name, None)
        found = await self._call("fail", name, config, probe=probe)
        if found is not None and found[0] in ("opened", "reopened"):
            self.opened += 1
            log.warning("endpoint.cooldown", endpoint=name, state=found[0], ms=found[1])

    async def probe_succeeded(self, name: str, config: EndpointConfig) -> None:
        """The probe answered: the endpoint closes (an ordinary answer changes nothing)."""
        await self._call("ok", name, config, probe=True)
        log.info("endpoint.recovered", endpoint=name)

    async def give_back_probe(self, name: str, config: EndpointConfig) -> None:
        """The probe was taken but no call made (no capacity): another may probe."""
        await self._call("unprobe", name, config, probe=True)

    async def pause(self, name: str, config: EndpointConfig, seconds: float) -> None:
        """Nobody calls the endpoint for ``seconds`` (the provider's Retry-After)."""
        self._healthy_at.pop(name, None)
        ms = max(1, int(seconds * 1000))
        if await self._call("pause", name, config, ms=ms) is not None:
            log.info("endpoint.paused", endpoint=name, ms=ms)
