"""Fleet-wide endpoint health in Redis: threshold, cooldown, one probe, pause, fail open."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.worker.cooldowns import Cooldowns, Health
from services.worker.settings import EndpointConfig
from shared.endpoint_state import endpoint_states
from shared.names import Names
from tests.support.fleet import until_endpoint_state
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

CONFIG = EndpointConfig(
    kind="openai",
    base_url="http://127.0.0.1:9/v1",
    timeout_s=5,
    cooldown_failures=3,
    cooldown_window_s=10,
    cooldown_s=0.3,
)


def two_workers(redis: Redis, namespace: str) -> tuple[Cooldowns, Cooldowns]:
    """Two workers' views: separate objects, one Redis."""
    names = Names(namespace)
    return Cooldowns(redis, names, 1.0), Cooldowns(redis, names, 1.0)


async def until_state(redis: Redis, namespace: str, state: str) -> None:
    """Until the endpoint ``ep`` is in ``state``."""
    await until_endpoint_state(redis, Names(namespace), "ep", state)


async def test_threshold_opens_the_endpoint_for_every_worker(redis: Redis, namespace: str) -> None:
    one, other = two_workers(redis, namespace)
    for _ in range(CONFIG.cooldown_failures - 1):
        await one.failed("ep", CONFIG, probe=False)
    assert (await other.check("ep", CONFIG)).health is Health.CLOSED
    await other.failed("ep", CONFIG, probe=False)  # the threshold, counted across workers
    verdict = await one.check("ep", CONFIG)
    assert verdict.health is Health.OPEN
    assert 0 < verdict.wait_s <= CONFIG.cooldown_s
    (state,) = await endpoint_states(redis, Names(namespace), ["ep"])
    assert state.state == "open"


async def test_after_the_cooldown_one_probe_then_traffic_returns(
    redis: Redis, namespace: str
) -> None:
    one, other = two_workers(redis, namespace)
    for _ in range(CONFIG.cooldown_failures):
        await one.failed("ep", CONFIG, probe=False)
    await until_state(redis, namespace, "half_open")
    verdicts = await asyncio.gather(*(w.check("ep", CONFIG) for w in (one, other, one, other)))
    assert sorted(v.health.value for v in verdicts) == ["probe", "probing", "probing", "probing"]
    await one.probe_succeeded("ep", CONFIG)
    assert (await other.check("ep", CONFIG)).health is Health.CLOSED


async def test_a_failed_probe_opens_the_endpoint_again(redis: Redis, namespace: str) -> None:
    one, other = two_workers(redis, namespace)
    for _ in range(CONFIG.cooldown_failures):
        await one.failed("ep", CONFIG, probe=False)
    await until_state(redis, namespace, "half_open")
    assert (await other.check("ep", CONFIG)).health is Health.PROBE
    await other.failed("ep", CONFIG, probe=True)
    assert (await one.check("ep", CONFIG)).health is Health.OPEN


async def test_failures_outside_the_window_do_not_add_up(redis: Redis, namespace: str) -> None:
    one, _ = two_workers(redis, namespace)
    short = CONFIG.model_copy(update={"cooldown_window_s": 0.2})
    for _ in range(short.cooldown_failures - 1):
        await one.failed("ep", short, probe=False)
    await asyncio.sleep(0.3)  # the window itself is what is tested: let it pass
    await one.failed("ep", short, probe=False)
    assert (await one.check("ep", short)).health is Health.CLOSED


async def test_a_pause_holds_for_everyone_for_that_long(redis: Redis, namespace: str) -> None:
    one, other = two_workers(redis, namespace)
    await one.pause("ep", CONFIG, 0.4)
    verdict = await other.check("ep", CONFIG)
    assert verdict.health is Health.PAUSED
    assert 0.3 < verdict.wait_s <= 0.4
    await until_state(redis, namespace, "closed")


async def test_redis_down_fails_open() -> None:
    dead = Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    cooldowns = Cooldowns(dead, Names("nowhere"), 0.5)
    try:
        assert (await cooldowns.check("ep", CONFIG)).health is Health.CLOSED
        await cooldowns.failed("ep", CONFIG, probe=False)  # no raise
        assert cooldowns.redis_errors == 2
    finally:
        await dead.aclose()


async def test_checks_asked_at_once_make_one_redis_call_but_one_probe(
    redis: Redis, namespace: str
) -> None:
    one, _ = two_workers(redis, namespace)
    calls = 0
    script = one._script

    async def counted(keys: list[str], args: list[str | int]) -> object:
        nonlocal calls
        calls += 1
        return await script(keys=keys, args=args)

    one._script = counted  # type: ignore[assignment]
    verdicts = await asyncio.gather(*(one.check("ep", CONFIG) for _ in range(20)))
    assert {v.health for v in verdicts} == {Health.CLOSED}
    assert calls == 1
    for _ in range(CONFIG.cooldown_failures):
        await one.failed("ep", CONFIG, probe=False)
    calls = 0
    verdicts = await asyncio.gather(*(one.check("ep", CONFIG) for _ in range(20)))
    assert {v.health for v in verdicts} == {Health.OPEN}
    assert calls == 1
    await until_state(redis, namespace, "half_open")
    verdicts = await asyncio.gather(*(one.check("ep", CONFIG) for _ in range(5)))
    assert sorted(v.health.value for v in verdicts) == ["probe"] + ["probing"] * 4
