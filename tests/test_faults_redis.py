"""Redis faults on a private Redis (issue 11): usage counted exactly once through a freeze,
and what callers and operators see while Redis is frozen or killed.

The gateway under test keeps its keys, limits and usage in a private ``redis-server`` that
the tests freeze (SIGSTOP) and kill; RabbitMQ is the shared one, in a namespace of the test's.
Measured times are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.registry import Registry
from shared.settings import CommonSettings
from tests.support.client import auth, chat
from tests.support.private_servers import PrivateRedis
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

TOKEN = "faults-admin-token"


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis that keeps its data through a kill, as a production one would."""
    (tmp_path / "durable").mkdir()
    server = PrivateRedis(tmp_path / "durable", config=["appendonly yes", "appendfsync always"])
    try:
        server.start_blocking()
        yield server
    finally:
        server.close()


@pytest.fixture
async def private_registry(private_redis: PrivateRedis, namespace: str) -> AsyncIterator[Registry]:
    """Bots and keys of the test's namespace, in the private Redis."""
    client = Redis.from_url(private_redis.url, socket_timeout=5)
    yield Registry(client, CommonSettings(namespace=namespace).names)
    await client.aclose()


async def test_usage_is_counted_once_through_a_redis_freeze(
    bare_stack: Stack, private_redis: PrivateRedis, private_registry: Registry
) -> None:
    """A flush sent to a frozen Redis times out and is applied when Redis resumes; sent
    again, it must not be applied twice: the counters equal the requests answered."""
    await bare_stack.add_worker()
    # Flushes only when the test says (and at shutdown), so one is surely caught by the freeze.
    await bare_stack.add_gateway(
        redis_url=private_redis.url, usage_flush_s=3600, admin_tokens=[TOKEN]
    )
    bot = await private_registry.create_bot(name="b", endpoint="echo", model="m")
    key, record = await private_registry.create_key(bot.id, "k")
    answers = await asyncio.gather(
        *(
            chat(bare_stack.http, bare_stack.url, key, {
                "messages": [{"role": "user", "content": f"count me {i} " + "x " * i}]
            })
            for i in range(12)
        )
    )  # fmt: skip
    assert all(status == 200 for status, _, _ in answers)
    tokens = sum(body["usage"]["totalTokens"] for _, body, _ in answers)

    book = bare_stack.gateway().usage
    private_redis.freeze()
    try:
        started = time.monotonic()
        await book.flush()  # written to the socket, no reply: times out, stays pending
        assert time.monotonic() - started < 3
    finally:
        private_redis.thaw()  # ...and Redis now applies what it had been sent
    await book.flush()  # the retry

    async with bare_stack.http.get(
        f"{bare_stack.url}/admin/api/bots/{bot.id}/usage", headers=auth(TOKEN)
    ) as resp:
        assert resp.status == 200
        usage = await resp.json()
    assert usage["requests"] == len(answers)
    assert usage["total_tokens"] == tokens
    names = private_registry.names
    key_usage, bot_usage = await private_registry.usage(
        [names.key_usage(record.key_id), names.bot_usage(bot.id)]
    )
    assert key_usage["requests"] == bot_usage["requests"] == len(answers)


async def _until(
    http: aiohttp.ClientSession, url: str, key: str, want: int, limit_s: float = 30
) -> tuple[float, float]:
    """Ask until a request answers ``want``; returns (seconds until then, slowest request)."""
    started = time.monotonic()
    slowest = 0.0
    ask = {"messages": [{"role": "user", "content": "are you there"}]}
    while True:
        sent = time.monotonic()
        status, _, _ = await chat(http, url, key, ask)
        slowest = max(slowest, time.monotonic() - sent)
        if status == want:
            return time.monotonic() - started, slowest
        assert time.monotonic() - started < limit_s, f"no {want} within {limit_s} s"
        await asyncio.sleep(0.05)  # polling: nothing to await on the caller's side


async def _ready(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/readyz") as resp:
        return resp.status


async def _until_ready(http: aiohttp.ClientSession, url: str, limit_s: float = 30) -> float:
    """Poll ``/readyz`` until 200 (the key cache resubscribes on its own schedule)."""
    started = time.monotonic()
    while await _ready(http, url) != 200:
        assert time.monotonic() - started < limit_s, f"not ready within {limit_s} s"
        await asyncio.sleep(0.05)  # polling: readiness has nothing to await
    return time.monotonic() - started


async def test_redis_frozen_or_killed_callers_get_503_fast_and_recover(
    bare_stack: Stack, durable_redis: PrivateRedis, namespace: str
) -> None:
    """Fail closed, fast: a frozen or killed Redis turns requests into 503 within about a
    second (never 401, never an unchecked key), readiness goes 503, and the first success
    follows within seconds of Redis being back, without a restart."""
    await bare_stack.add_worker()
    await bare_stack.add_gateway(redis_url=durable_redis.url)
    client = Redis.from_url(durable_redis.url, socket_timeout=5)
    private_registry = Registry(client, CommonSettings(namespace=namespace).names)
    bot = await private_registry.create_bot(name="b", endpoint="echo", model="m")
    key, _ = await private_registry.create_key(bot.id, "k")
    http, url = bare_stack.http, bare_stack.url
    assert (await _until(http, url, key, 200, limit_s=5))[0] < 5

    durable_redis.freeze()
    try:
        to_503, slowest_frozen = await _until(http, url, key, 503)
        assert await _ready(http, url) == 503
    finally:
        durable_redis.thaw()
    back_after_thaw, _ = await _until(http, url, key, 200)
    ready_after_thaw = back_after_thaw + await _until_ready(http, url)

    await durable_redis.kill()
    killed_503, slowest_killed = await _until(http, url, key, 503)
    assert await _ready(http, url) == 503
    await durable_redis.restart()
    back_after_restart, _ = await _until(http, url, key, 200)
    ready_after_restart = back_after_restart + await _until_ready(http, url)
    await client.aclose()
    assert slowest_frozen < 3
    assert slowest_killed < 3
    print(
        f"\nmeasured: redis frozen: first 503 after {to_503:.2f} s (slowest request "
        f"{slowest_frozen:.2f} s), first 200 {back_after_thaw:.2f} s after thaw; redis killed: "
        f"first 503 after {killed_503:.2f} s (slowest {slowest_killed:.2f} s), first 200 "
        f"{back_after_restart:.2f} s after restart; ready again {ready_after_thaw:.2f} s after "
        f"thaw, {ready_after_restart:.2f} s after restart"
    )
