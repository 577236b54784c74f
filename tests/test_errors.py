"""SPEC §3: every error before a stream starts has a real status, a code and a request id."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from shared.clock import now_ms
from tests.support.metrics import scrape
from tests.support.stack import ProcessFactory, Stack, free_port
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
SECRET_CONTENT = "my-private-words-1234"


def assert_error(result: tuple[int, dict[str, Any], Any], status: int, code: str) -> None:
    got_status, body, headers = result
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": SECRET_CONTENT}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (HELLO | {"stream": "yes"}, "stream"),
        (HELLO | {"max_tokens": 0}, "max_tokens"),
        (HELLO | {"temperature": 2.5}, "temperature"),
        (HELLO | {"top_p": -1}, "top_p"),
    ],
)
async def test_invalid_body_is_400_naming_the_field(
    stack: Stack, body: Any, param: str | None
) -> None:
    _, key = await stack.bot_and_key()
    result = await stack.chat(key, body)
    assert_error(result, 400, "invalid_request")
    error = result[1]["error"]
    assert error["param"] == param
    if param:
        assert error["message"].startswith(param)
    assert SECRET_CONTENT not in error["message"]
    assert "wizard" not in error["message"]


async def test_unknown_fields_are_ignored(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    status, body, _ = await stack.chat(key, HELLO | {"model": "gpt-4", "frobnicate": [1]})
    assert status == 200
    assert body["choices"]["message"]["content"] == "Hello"


async def test_missing_malformed_and_unknown_keys_are_401(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    assert_error(await stack.chat(None, HELLO), 401, "invalid_api_key")
    assert_error(await stack.chat("bl-short", HELLO), 401, "invalid_api_key")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert_error(await stack.chat(tampered, HELLO), 401, "invalid_api_key")
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=HELLO, headers={"Authorization": f"Basic {key}"}
    ) as resp:
        assert resp.status == 401
    from shared.keys import generate

    assert_error(await stack.chat(generate(), HELLO), 401, "invalid_api_key")


async def test_disabled_and_expired_keys_are_401(stack: Stack) -> None:
    bot, key = await stack.bot_and_key()
    record = (await stack.registry.list_keys(bot.id))[0]
    await stack.registry.set_disabled(record.key_id, True)
    assert_error(await stack.chat(key, HELLO), 401, "api_key_disabled")
    await stack.registry.set_disabled(record.key_id, False)
    assert (await stack.chat(key, HELLO))[0] == 200
    expired, _ = await stack.registry.create_key(bot.id, "old", expires_at=now_ms() - 1)
    assert_error(await stack.chat(expired, HELLO), 401, "api_key_expired")


async def test_deleted_bot_is_404(stack: Stack) -> None:
    bot, key = await stack.bot_and_key()
    assert (await stack.chat(key, HELLO))[0] == 200
    await stack.registry.delete_bot(bot.id)
    assert_error(await stack.chat(key, HELLO), 404, "bot_not_found")


async def test_body_over_the_limit_is_413(bare_stack: Stack) -> None:
    await bare_stack.add_worker()
    await bare_stack.add_gateway(max_body_bytes=4096)
    _, key = await bare_stack.bot_and_key()
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(await bare_stack.chat(key, big), 413, "request_too_large")


async def test_unknown_route_and_method(stack: Stack) -> None:
    async with stack.http.get(f"{stack.url}/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        assert resp.headers["X-Request-Id"]
    async with stack.http.get(f"{stack.url}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_request_id_is_echoed_or_made(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    _, _, headers = await stack.chat(key, HELLO, headers={"X-Request-Id": "abc-123"})
    assert headers["X-Request-Id"] == "abc-123"
    _, _, headers = await stack.chat(key, HELLO, headers={"X-Request-Id": "bad id!"})
    assert headers["X-Request-Id"].startswith("req_")


async def test_no_worker_within_the_deadline_is_504(bare_stack: Stack) -> None:
    await bare_stack.add_gateway(request_deadline_s=0.5)
    _, key = await bare_stack.bot_and_key()
    assert_error(await bare_stack.chat(key, HELLO), 504, "deadline_exceeded")


async def test_full_queue_is_503_overloaded(bare_stack: Stack) -> None:
    # No worker, room for one job: of three callers at once, the first job
    # published is queued (its caller waits out the deadline), the two others
    # are refused at once. Publishes are confirmed in order on one channel.
    await bare_stack.add_gateway(request_deadline_s=1, jobs_max_length=1)
    _, key = await bare_stack.bot_and_key()
    results = await asyncio.gather(*(bare_stack.chat(key, HELLO) for _ in range(3)))
    statuses = sorted(result[0] for result in results)
    assert statuses == [503, 503, 504], statuses
    for result in results:
        if result[0] == 503:
            assert_error(result, 503, "overloaded")
            assert result[2]["Retry-After"] == "1"


async def test_expired_jobs_do_not_hold_the_queue(bare_stack: Stack) -> None:
    """Issue 11.3: a job's deadline is its AMQP expiration, so the broker drops it.

    No worker ever runs: only the broker can have removed the expired jobs.
    """
    await bare_stack.add_gateway(request_deadline_s=0.3, jobs_max_length=5)
    _, key = await bare_stack.bot_and_key()
    for _ in range(5):
        assert_error(await bare_stack.chat(key, HELLO), 504, "deadline_exceeded")
    # The queue held five jobs whose callers are gone; a new caller is queued
    # (and, with no worker, also waits out its deadline) instead of being refused.
    for _ in range(5):
        assert_error(await bare_stack.chat(key, HELLO), 504, "deadline_exceeded")


async def test_redis_unreachable_is_503_and_never_serves(bare_stack: Stack) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        await bare_stack.add_worker()
        await bare_stack.add_gateway(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_s=0.5
        )
        _, key = await bare_stack.bot_and_key()
        assert (await bare_stack.chat(key, HELLO))[0] == 200  # the key is now cached
        await proxy.down()
        await wait_ready(bare_stack.http, bare_stack.url, False)
        result = await bare_stack.chat(key, HELLO)
        assert_error(result, 503, "backend_unavailable")
        assert result[2]["Retry-After"]
        # A malformed key needs no Redis call: still a plain 401.
        assert_error(await bare_stack.chat("bl-nope", HELLO), 401, "invalid_api_key")
        await proxy.up()
        await wait_ready(bare_stack.http, bare_stack.url, True)
        assert (await bare_stack.chat(key, HELLO))[0] == 200


async def test_redis_frozen_is_503_within_the_timeout(bare_stack: Stack) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        await bare_stack.add_worker()
        await bare_stack.add_gateway(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_s=0.5
        )
        bot, _ = await bare_stack.bot_and_key()
        key, _ = await bare_stack.registry.create_key(bot.id)
        proxy.freeze()
        assert_error(await bare_stack.chat(key, HELLO), 503, "backend_unavailable")
        await wait_ready(bare_stack.http, bare_stack.url, False)
        proxy.thaw()
        await wait_ready(bare_stack.http, bare_stack.url, True)
        assert (await bare_stack.chat(key, HELLO))[0] == 200


async def test_rabbitmq_unreachable_is_503(bare_stack: Stack) -> None:
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        await bare_stack.add_worker()
        await bare_stack.add_gateway(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", publish_timeout_s=1
        )
        _, key = await bare_stack.bot_and_key()
        assert (await bare_stack.chat(key, HELLO))[0] == 200
        await proxy.down()
        await wait_ready(bare_stack.http, bare_stack.url, False)
        result = await bare_stack.chat(key, HELLO)
        assert_error(result, 503, "backend_unavailable")
        assert result[2]["Retry-After"]
        down = await scrape(bare_stack.http, bare_stack.url)
        assert down.value("botline_backend_up", backend="amqp") == 0
        assert down.value("botline_backend_up", backend="redis") == 1
        await proxy.up()
        await wait_ready(bare_stack.http, bare_stack.url, True)
        assert (await bare_stack.chat(key, HELLO))[0] == 200
        up = await scrape(bare_stack.http, bare_stack.url)
        assert up.value("botline_backend_up", backend="amqp") == 1


async def wait_ready(http: aiohttp.ClientSession, url: str, ready: bool) -> None:
    """Poll /readyz until it says ``ready`` (bounded; readiness has no push channel)."""
    want = 200 if ready else 503
    async with asyncio.timeout(20):
        while True:
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == want:
                    return
            await asyncio.sleep(0.05)


async def test_a_caller_that_never_finishes_its_request_head_is_disconnected(
    processes: ProcessFactory,
) -> None:
    """Slowloris: a head sent a header at a time is cut off after KEEPALIVE_TIMEOUT_S."""
    port = free_port()
    await processes("gateway", "--port", str(port), BOTLINE_KEEPALIVE_TIMEOUT_S="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: botline\r\n")
    try:
        async with asyncio.timeout(10):
            while True:
                writer.write(b"X-Slow: 1\r\n")  # never the blank line that ends a head
                try:
                    if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                        break  # closed by the gateway
                except TimeoutError:
                    continue
    except ConnectionError:
        pass  # closed under our feet: what is tested
    finally:
        writer.close()
    held = loop.time() - started
    assert held < 5, f"the connection was held {held:.1f} s"
