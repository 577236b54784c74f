"""The fleet's shared provider budget in Redis: rpm reservations, tpm, calls in flight."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.worker.budget import Budget, Grant, Refusal
from services.worker.settings import EndpointConfig
from shared.names import Names
from tests.support.stack import free_port

pytestmark = pytest.mark.integration


def budget(redis: Redis, namespace: str, window_s: float = 1.0) -> Budget:
    """One worker's view of the budget (margin 0: the window is exact)."""
    return Budget(redis, Names(namespace), window_s=window_s, margin_s=0, timeout_s=1.0)


def config(**limits: int) -> EndpointConfig:
    return EndpointConfig(kind="openai", base_url="http://127.0.0.1:9/v1", **limits)


async def test_rpm_is_shared_and_later_calls_get_a_place_in_line(
    redis: Redis, namespace: str
) -> None:
    cfg = config(rpm=3)
    workers = [budget(redis, namespace) for _ in range(3)]
    first = await asyncio.gather(
        *(w.take("ep", cfg, tokens=1, lease_s=5, max_wait_s=0) for w in workers)
    )
    assert all(isinstance(g, Grant) and g.delay_s == 0 for g in first)
    # The fourth call, from any worker, may not go now...
    refused = await workers[0].take("ep", cfg, tokens=1, lease_s=5, max_wait_s=0)
    assert isinstance(refused, Refusal)
    assert refused.reason == "rpm"
    assert 0.9 < refused.wait_s <= 1.01
    # ...but takes a reserved place when it may wait, and the next one the next place.
    queued = [
        await w.take("ep", cfg, tokens=1, lease_s=5, max_wait_s=2) for w in (workers[1], workers[2])
    ]
    assert all(isinstance(g, Grant) for g in queued)
    delays = [g.delay_s for g in queued if isinstance(g, Grant)]
    assert all(0.9 < d <= 1.01 for d in delays)
    # Three reserved for the next window: a fourth would be two windows out.
    assert isinstance(await workers[0].take("ep", cfg, tokens=1, lease_s=5, max_wait_s=2), Grant)
    late = await workers[0].take("ep", cfg, tokens=1, lease_s=5, max_wait_s=1.5)
    assert isinstance(late, Refusal)
    assert 1.9 < late.wait_s <= 2.02


async def test_tpm_counts_reservations_then_real_usage(redis: Redis, namespace: str) -> None:
    cfg = config(tpm=100)
    worker = budget(redis, namespace, window_s=30)
    grant = await worker.take("ep", cfg, tokens=60, lease_s=5, max_wait_s=0)
    assert isinstance(grant, Grant)
    refused = await worker.take("ep", cfg, tokens=60, lease_s=5, max_wait_s=0)
    assert isinstance(refused, Refusal)
    assert refused.reason == "tpm"
    await worker.settle(grant, cfg, used_tokens=10)  # the answer was short
    assert isinstance(await worker.take("ep", cfg, tokens=60, lease_s=5, max_wait_s=0), Grant)


async def test_calls_in_flight_are_leases_given_back(redis: Redis, namespace: str) -> None:
    cfg = config(max_in_flight=2)
    one, other = budget(redis, namespace), budget(redis, namespace)
    first = await one.take("ep", cfg, tokens=1, lease_s=30, max_wait_s=0)
    second = await other.take("ep", cfg, tokens=1, lease_s=30, max_wait_s=0)
    assert isinstance(first, Grant)
    assert isinstance(second, Grant)
    refused = await other.take("ep", cfg, tokens=1, lease_s=30, max_wait_s=0)
    assert isinstance(refused, Refusal)
    assert refused.reason == "max_in_flight"
    await one.settle(first, cfg, used_tokens=5)
    assert isinstance(await other.take("ep", cfg, tokens=1, lease_s=30, max_wait_s=0), Grant)


async def test_a_dead_workers_lease_lapses(redis: Redis, namespace: str) -> None:
    cfg = config(max_in_flight=1)
    worker = budget(redis, namespace)
    assert isinstance(await worker.take("ep", cfg, tokens=1, lease_s=0.2, max_wait_s=0), Grant)
    assert isinstance(await worker.take("ep", cfg, tokens=1, lease_s=0.2, max_wait_s=0), Refusal)
    async with asyncio.timeout(2):
        while isinstance(  # noqa: ASYNC110 -- a lease lapsing in Redis is not announced
            await worker.take("ep", cfg, tokens=1, lease_s=0.2, max_wait_s=0), Refusal
        ):
            await asyncio.sleep(0.05)


async def test_redis_down_fails_open() -> None:
    dead = Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    worker = Budget(dead, Names("nowhere"), window_s=60, margin_s=0, timeout_s=0.5)
    try:
        grant = await worker.take("ep", config(rpm=1), tokens=1, lease_s=5, max_wait_s=0)
        assert isinstance(grant, Grant)
        assert worker.redis_errors == 1
    finally:
        await dead.aclose()
