"""Per-key limits hold across gateways, in one atomic step, on both surfaces."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aio_pika
import aiohttp
import pytest

from shared.records import Limits
from shared.settings import CommonSettings
from tests.support.client import auth, chat, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import AMQP_URL, ProcessFactory, Stack, free_port

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hi"}]}
SURFACES = ("/v1/chat/completions", "/openai/v1/chat/completions")


async def ask(
    http: aiohttp.ClientSession, url: str, key: str, surface: str = SURFACES[0]
) -> tuple[int, dict[str, Any], Any]:
    body = ASK | ({"model": "m"} if "openai" in surface else {})
    return await chat(http, url, key, body, path=surface)


async def queued_jobs(namespace: str, count: int) -> None:
    """Until the namespace's job queue holds ``count`` jobs (polled: nothing to await)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, asyncio.timeout(10):
        channel = await connection.channel()
        name = CommonSettings(namespace=namespace).names.jobs_queue
        while True:
            queue = await channel.declare_queue(name, passive=True)
            if (queue.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.02)


async def key_with(stack: Stack, **limits: int) -> str:
    bot = await stack.registry.create_bot(name="limited", endpoint="echo", model="m")
    key, _ = await stack.registry.create_key(bot.id, "k", limits=Limits(**limits))
    return key


async def test_fifty_concurrent_requests_against_ten_a_minute_admit_exactly_ten(
    bare_stack: Stack,
) -> None:
    await bare_stack.add_worker()
    first = await bare_stack.add_gateway()
    second = await bare_stack.add_gateway()  # the limit is shared by every gateway
    key = await key_with(bare_stack, rpm=10)
    results = await asyncio.gather(
        *(
            ask(bare_stack.http, (first, second)[i % 2], key, SURFACES[(i // 2) % 2])
            for i in range(50)
        )
    )
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    for status, body, headers in results:
        assert headers["x-ratelimit-limit-requests"] == "10"
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(headers["Retry-After"]) <= 6
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_an_unlimited_key_has_no_rate_limit_headers(stack: Stack) -> None:
    key = await key_with(stack)
    status, _, headers = await ask(stack.http, stack.url, key)
    assert status == 200
    assert "x-ratelimit-limit-requests" not in headers


async def test_bot_defaults_apply_and_keys_override_them(stack: Stack) -> None:
    bot = await stack.registry.create_bot(
        name="b", endpoint="echo", model="m", limits=Limits(rpm=2)
    )
    default_key, _ = await stack.registry.create_key(bot.id)
    own_key, _ = await stack.registry.create_key(bot.id, limits=Limits(rpm=5))
    assert [(await ask(stack.http, stack.url, default_key))[0] for _ in range(3)] == [
        200,
        200,
        429,
    ]
    _, _, headers = await ask(stack.http, stack.url, own_key)
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"


async def test_tokens_per_minute_refuse_a_key_that_spent_its_budget(stack: Stack) -> None:
    key = await key_with(stack, tpm=30)
    long_ask = {"messages": [{"role": "user", "content": " ".join(["word"] * 40)}]}
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=long_ask, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-tokens"] == "30"
        assert (await resp.json())["usage"]["totalTokens"] > 30
    # The answer's tokens are charged as the request ends; then the key waits.
    async with asyncio.timeout(5):
        while (result := await ask(stack.http, stack.url, key))[0] != 429:
            pass
    _, body, headers = result
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert "tokens" in body["error"]["message"]


async def open_stream(http: aiohttp.ClientSession, url: str, key: str) -> aiohttp.ClientResponse:
    resp = await http.post(
        f"{url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    )
    assert resp.status == 200, await resp.text()
    assert (await anext(sse_events(resp)))["status"] == "START"  # type: ignore[index]
    return resp


async def test_concurrency_slots_are_taken_and_given_back(stack: Stack) -> None:
    up = stack.upstream
    bot = await stack.registry.create_bot(name="c", endpoint="fake", model="m")
    key, _ = await stack.registry.create_key(bot.id, limits=Limits(concurrency=2))
    holds = [Script(tokens=["a ", "b"], hold_after=1) for _ in range(3)]
    for script in holds:
        up.script(script)
    streams = [await open_stream(stack.http, stack.url, key) for _ in range(2)]
    status, body, _ = await ask(stack.http, stack.url, key)
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert "concurrent" in body["error"]["message"]
    # A stream that ends gives its slot back...
    holds[0].release.set()
    await streams[0].read()
    streams[0].close()
    third = await until_admitted(stack, key)
    # ...and so does a caller that hangs up.
    streams[1].close()
    third.close()
    holds[2].release.set()
    fourth = await until_admitted(stack, key)
    fourth.close()


async def until_admitted(stack: Stack, key: str) -> aiohttp.ClientResponse:
    """Retry (bounded) until a stream is admitted: slots come back as requests settle."""
    async with asyncio.timeout(5):
        while True:
            resp = await stack.http.post(
                f"{stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
            )
            if resp.status == 200:
                return resp
            assert resp.status == 429
            resp.close()


async def test_a_killed_gateways_slots_come_back_after_the_lease(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    await bare_stack.add_worker()
    await bare_stack.add_gateway(lease_ttl_s=1.5)
    bot = await bare_stack.registry.create_bot(name="c", endpoint="echo-slow", model="m")
    key, _ = await bare_stack.registry.create_key(bot.id, limits=Limits(concurrency=2))
    port = free_port()
    doomed = await processes("gateway", "--port", str(port), BOTLINE_LEASE_TTL_S="1.5")
    long_ask = {"stream": True, "messages": [{"role": "user", "content": "w " * 500}]}
    held = []
    for _ in range(2):
        resp = await bare_stack.http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=long_ask, headers=auth(key)
        )
        assert resp.status == 200
        held.append(resp)
    assert (await ask(bare_stack.http, bare_stack.url, key))[0] == 429
    doomed.signal(signal.SIGKILL)
    await doomed.wait()
    for resp in held:
        resp.close()
    # Nobody releases those slots: they come back when their leases expire.
    assert (await ask(bare_stack.http, bare_stack.url, key))[0] == 429
    async with asyncio.timeout(10):
        # Time itself is the event here: poll, gently, until the leases lapse.
        while (await ask(bare_stack.http, bare_stack.url, key))[0] != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_a_request_refused_by_a_full_queue_gives_its_slot_back(bare_stack: Stack) -> None:
    # No worker, room for one job: another key's caller keeps it queued (a job
    # that expired would leave the queue by itself); every later job of the
    # limited key is admitted, then refused by the queue.
    await bare_stack.add_gateway(request_deadline_s=30, jobs_max_length=1)
    _, other = await bare_stack.bot_and_key()
    holder = asyncio.create_task(ask(bare_stack.http, bare_stack.url, other))
    try:
        await queued_jobs(bare_stack.namespace, 1)
        key = await key_with(bare_stack, concurrency=1)
        for _ in range(2):
            status, body, _ = await ask(bare_stack.http, bare_stack.url, key)
            # Not 429: the one slot came back when the last job could not be queued.
            assert (status, body["error"]["code"]) == (503, "overloaded")
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)


async def test_a_lease_lasts_as_long_as_its_request(bare_stack: Stack) -> None:
    # A 1 s lease: the leases' sorted set got a 2 s TTL at admission, and
    # renewing the leases in it did not extend that, so past 2 s the key
    # forgot its request in flight and admitted a second one.
    up = bare_stack.upstream
    await bare_stack.add_worker()
    await bare_stack.add_gateway(lease_ttl_s=1)
    bot = await bare_stack.registry.create_bot(name="c", endpoint="fake", model="m")
    key, _ = await bare_stack.registry.create_key(bot.id, limits=Limits(concurrency=1))
    held = Script(tokens=["a ", "b"], hold_after=1)
    up.script(held)
    stream = await open_stream(bare_stack.http, bare_stack.url, key)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        # Over four lease TTLs, more than twice the key's TTL set at admission.
        while (elapsed := loop.time() - start) < 4.5:
            status, body, _ = await ask(bare_stack.http, bare_stack.url, key)
            assert status == 429, f"a second request was admitted {elapsed:.1f} s in"
            assert body["error"]["code"] == "rate_limit_exceeded"
            # Time itself is the event: ask again, gently, for the whole request.
            await asyncio.sleep(0.2)
    finally:
        held.release.set()
    assert [e async for e in sse_events(stream)][-1]["status"] == "END"  # type: ignore[index]
    stream.close()
    # The slot comes back when the stream ends.
    (await until_admitted(bare_stack, key)).close()


async def test_concurrent_requests_cannot_spend_more_tokens_than_a_minute_holds(
    bare_stack: Stack,
) -> None:
    # Twenty requests at once against 100 tokens a minute, on two gateways:
    # each reserves its estimate (prompt 10 words + 6, plus max_tokens 20 =
    # 36) when admitted, so only as many as fit are. Checked only, not
    # reserved, all twenty were admitted and served 520 tokens.
    await bare_stack.add_worker()
    first = await bare_stack.add_gateway()
    second = await bare_stack.add_gateway()
    bot = await bare_stack.registry.create_bot(name="t", endpoint="echo-slow", model="m")
    key, _ = await bare_stack.registry.create_key(bot.id, limits=Limits(tpm=100))
    ask: dict[str, Any] = {"max_tokens": 20, "messages": [{"role": "user", "content": "w " * 10}]}
    results = await asyncio.gather(
        *(chat(bare_stack.http, (first, second)[i % 2], key, ask) for i in range(20))
    )
    served = [body["usage"]["totalTokens"] for status, body, _ in results if status == 200]
    assert served, "nothing was admitted"
    # The echo model's usage is the estimate itself: no estimate error to allow for.
    assert sum(served) <= 100, served
    for status, body, headers in results:
        assert status in (200, 429)
        assert headers["x-ratelimit-limit-tokens"] == "100"
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert "tokens per minute" in body["error"]["message"]
