"""Key changes reach every gateway process within a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.keys import generate
from tests.support.client import chat
from tests.support.stack import ProcessFactory, Stack, free_port
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


async def status_of(stack: Stack, url: str, key: str) -> tuple[int, str | None]:
    status, body, _ = await chat(stack.http, url, key, HELLO)
    return status, body.get("error", {}).get("code") if status != 200 else None


async def refused_within(stack: Stack, url: str, key: str, code: str, seconds: float) -> float:
    """Ask until the key is refused with ``code``; the time it took (fails past ``seconds``)."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        # Each round trip is the wait: there is no event to await from outside.
        while (await status_of(stack, url, key)) != (401, code):
            pass
    return time.monotonic() - started


async def test_revoke_and_disable_hold_on_a_second_gateway_process_within_1s(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    await bare_stack.add_worker()
    await bare_stack.add_gateway()  # gateway 1, in this process
    port = free_port()
    await processes("gateway", "--port", str(port))  # gateway 2, its own process
    second = f"http://127.0.0.1:{port}"
    bot, key = await bare_stack.bot_and_key()
    key_id = (await bare_stack.registry.list_keys(bot.id))[0].key_id

    # Both gateways have the key cached now.
    for url in (bare_stack.url, second):
        assert await status_of(bare_stack, url, key) == (200, None)

    await bare_stack.registry.set_disabled(key_id, True)
    await refused_within(bare_stack, second, key, "api_key_disabled", 1.0)
    await bare_stack.registry.set_disabled(key_id, False)
    async with asyncio.timeout(1.0):
        while (await status_of(bare_stack, second, key)) != (200, None):
            pass

    await bare_stack.registry.revoke(key_id)
    await refused_within(bare_stack, second, key, "invalid_api_key", 1.0)
    assert await status_of(bare_stack, bare_stack.url, key) == (401, "invalid_api_key")


async def test_malformed_key_makes_no_redis_call(bare_stack: Stack) -> None:
    """With Redis unreachable, a lookup would answer 503: a 401 shows none was made."""
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        await bare_stack.add_gateway(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        await proxy.down()
        well_formed_but_unknown = generate()
        assert await status_of(bare_stack, bare_stack.url, well_formed_but_unknown) == (
            503,
            "backend_unavailable",
        )
        tampered = well_formed_but_unknown[:-1] + (
            "x" if well_formed_but_unknown[-1] != "x" else "y"
        )
        for made_up in (tampered, "bl-" + "a" * 38, "bl-", "sk-123", "x" * 41):
            assert await status_of(bare_stack, bare_stack.url, made_up) == (401, "invalid_api_key")
