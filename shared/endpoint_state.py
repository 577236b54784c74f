"""The fleet's view of each model endpoint, read back for people: admin API, metrics, tests.

Workers write it (``services/worker/cooldowns.py``: one hash per endpoint;
``services/worker/budget.py``: the budget's sorted sets); this module only
reads, in one round trip, against Redis's own clock as the writers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared.names import Names

State = Literal["closed", "open", "half_open", "probing", "paused"]


class EndpointState(BaseModel):
    """One endpoint as the whole fleet sees it."""

    name: str
    state: State = Field(
        description="closed: in use; open: cooling down, skipped by every worker; "
        "half_open: cooled down, the next call is a probe; probing: a probe is out; "
        "paused: the provider's Retry-After"
    )
    failures: int = Field(0, description="failures counted in the current window")
    cooldown_ms: int = Field(0, description="until the cooldown ends")
    paused_ms: int = Field(0, description="until the provider's Retry-After ends")
    in_flight: int = Field(0, description="calls holding fleet capacity (declared endpoints)")
    recent_calls: int = Field(
        0, description="calls counted against the declared rpm, reservations included"
    )


def _int(value: bytes | str | None) -> int:
    return int(float(value)) if value is not None else 0


async def endpoint_states(redis: Redis, names: Names, endpoints: list[str]) -> list[EndpointState]:
    """The state of each endpoint named, in that order."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in endpoints:
            pipe.hgetall(names.endpoint_health(name))
            pipe.zcard(names.endpoint_budget(name, "inflight"))
            pipe.zcard(names.endpoint_budget(name, "rpm"))
        found = await pipe.execute()
    seconds, micros = found[0]
    now = int(seconds) * 1000 + int(micros) // 1000
    states = []
    for i, name in enumerate(endpoints):
        raw, in_flight, calls = found[1 + 3 * i : 4 + 3 * i]
        record = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        open_until = _int(record.get("open_until"))
        paused_until = _int(record.get("paused_until"))
        probe_until = _int(record.get("probe_until"))
        state: State = "closed"
        if paused_until > now:
            state = "paused"
        elif open_until > now:
            state = "open"
        elif open_until:
            state = "probing" if probe_until > now else "half_open"
        states.append(
            EndpointState(
                name=name,
                state=state,
                failures=_int(record.get("fails")),
                cooldown_ms=max(0, open_until - now),
                paused_ms=max(0, paused_until - now),
                in_flight=int(in_flight),
                recent_calls=int(calls),
            )
        )
    return states


async def known_endpoints(redis: Redis, names: Names) -> list[str]:
    """The endpoint names the workers announced, sorted."""
    found = await redis.smembers(names.endpoints)
    return sorted(v.decode() if isinstance(v, bytes) else str(v) for v in found)
