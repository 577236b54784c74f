"""Repeated authentication failures from one address end in 429s with Retry-After."""

from __future__ import annotations

import pytest

from tests.support.stack import Stack

pytestmark = pytest.mark.integration

HELLO = {"messages": [{"role": "user", "content": "hi"}]}


async def test_an_address_that_keeps_failing_is_slowed_down(bare_stack: Stack) -> None:
    stack = bare_stack
    await stack.add_worker()
    await stack.add_gateway(auth_failures_per_minute=5)
    _, key = await stack.bot_and_key()
    assert (await stack.chat(key, HELLO))[0] == 200
    wrong = ["bl-short", None, key[:-2] + "zz", "bl-" + "A" * 38, key[:-8] + key[-6:] + "00"]
    for bad in wrong:
        status, body, _ = await stack.chat(bad, HELLO)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    for bad in (wrong[0], key):  # past the threshold, even a good key waits
        status, body, headers = await stack.chat(bad, HELLO)
        assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
        assert 1 <= int(headers["Retry-After"]) <= 60
    async with stack.http.get(
        f"{stack.url}/openai/v1/models", headers={"Authorization": "Bearer bl-nope"}
    ) as resp:
        assert resp.status == 429
