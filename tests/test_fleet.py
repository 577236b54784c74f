"""The fleet view: live workers listed from their heartbeats, and gone when those stop."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from services.worker.settings import EndpointConfig
from tests.support.client import auth
from tests.support.stack import ProcessFactory, Stack

pytestmark = pytest.mark.integration

TOKEN = "fleet-admin-token"


async def workers(stack: Stack) -> list[dict[str, Any]]:
    async with stack.http.get(f"{stack.url}/admin/api/workers", headers=auth(TOKEN)) as resp:
        assert resp.status == 200, await resp.text()
        listed: list[dict[str, Any]] = await resp.json()
        return listed


async def test_the_api_lists_live_workers_with_their_endpoints(bare_stack: Stack) -> None:
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    assert await workers(bare_stack) == []
    plain = await bare_stack.add_worker(concurrency=8)
    special = await bare_stack.add_worker(
        endpoints={"echo": EndpointConfig(kind="echo"), "special": EndpointConfig(kind="echo")}
    )
    listed = {w["worker_id"]: w for w in await workers(bare_stack)}
    assert set(listed) == {plain.worker_id, special.worker_id}
    assert listed[plain.worker_id]["endpoints"] == ["echo", "echo-slow", "fake"]
    assert listed[plain.worker_id]["capacity"] == 8
    assert listed[special.worker_id]["endpoints"] == ["echo", "special"]
    for worker in listed.values():
        assert worker["jobs_in_flight"] == 0
        assert worker["version"]
        assert abs(worker["seen_at"] - time.time() * 1000) < 60_000
    async with bare_stack.http.get(f"{bare_stack.url}/admin/api/workers") as resp:
        assert resp.status == 401  # the fleet is the admin's to see

    # A worker that stops cleanly leaves the list at once.
    await special.stop()
    bare_stack.workers.remove(special)
    assert [w["worker_id"] for w in await workers(bare_stack)] == [plain.worker_id]


async def test_an_expired_heartbeat_disappears(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    # Renewed every 0.2 s, alive 1 s after the last renewal.
    doomed = await processes("worker", BOTLINE_HEARTBEAT_S="0.2", BOTLINE_HEARTBEAT_TTL_S="1")
    (first,) = await workers(bare_stack)
    # Renewed, not a one-off: listed all along until a beat 1.2 s (past one TTL) later.
    async with asyncio.timeout(10):
        while True:
            (now,) = await workers(bare_stack)
            assert now["worker_id"] == first["worker_id"]
            if now["seen_at"] - first["seen_at"] >= 1200:
                break
            await asyncio.sleep(0.05)
    doomed.signal(signal.SIGKILL)  # no clean leave: only the TTL can take it off
    killed = time.monotonic()
    async with asyncio.timeout(5):  # polled: an expiry announces itself to nobody
        while True:
            if not await workers(bare_stack):
                break
            await asyncio.sleep(0.05)
    assert time.monotonic() - killed < 2.5
    # And the set of ids was pruned along with it.
    names = bare_stack.registry.names
    assert await bare_stack.registry.redis.smembers(names.workers) == set()


async def test_a_heartbeat_carries_the_jobs_in_flight(bare_stack: Stack) -> None:
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    worker = await bare_stack.add_worker(heartbeat_s=0.1)
    _, key = await bare_stack.bot_and_key(endpoint="echo-slow")
    ask = {"stream": True, "messages": [{"role": "user", "content": "a b c d e f g h i j"}]}
    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ask, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # the stream has started: the job runs
        async with asyncio.timeout(5):  # polled: the next heartbeat says so
            while True:
                (listed,) = await workers(bare_stack)
                if listed["jobs_in_flight"] == 1:
                    break
                await asyncio.sleep(0.05)
        await resp.read()
    await worker.stats.wait_for("done", 1)
    async with asyncio.timeout(5):
        while True:
            (listed,) = await workers(bare_stack)
            if listed["jobs_in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
