"""Usage accounting: sums match the answers, retries are counted once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.records import Limits
from tests.support.client import auth, chat, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import ProcessFactory, Stack, replace_worker_when_called

pytestmark = pytest.mark.integration

TOKEN = "usage-admin-token"


async def admin_get(stack: Stack, path: str) -> Any:
    async with stack.http.get(f"{stack.url}/admin/api{path}", headers=auth(TOKEN)) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_usage_sums_match_the_answers(bare_stack: Stack) -> None:
    await bare_stack.add_worker()
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    bot, key = await bare_stack.bot_and_key(endpoint="fake", model="m")
    other, _ = await bare_stack.registry.create_key(bot.id, "other")
    prompt = completion = 0
    for i in range(6):
        ask = {"messages": [{"role": "user", "content": "count me " + "x " * i}]}
        status, body, _ = await chat(bare_stack.http, bare_stack.url, key, ask)
        assert status == 200
        prompt += body["usage"]["promptTokens"]
        completion += body["usage"]["completionTokens"]
    async with bare_stack.http.post(
        f"{bare_stack.url}/openai/v1/chat/completions",
        json={"model": "m", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "streamed too"}]},
        headers=auth(key),
    ) as resp:  # fmt: skip
        events = [e async for e in sse_events(resp)]
    last = events[-2]
    assert isinstance(last, dict)
    usage = last["usage"]
    prompt += usage["prompt_tokens"]
    completion += usage["completion_tokens"]
    status, body, _ = await chat(
        bare_stack.http, bare_stack.url, other, {"messages": [{"role": "user", "content": "b"}]}
    )
    assert status == 200

    keys = {k["name"]: k["usage"] for k in await admin_get(bare_stack, f"/bots/{bot.id}/keys")}
    assert keys["test"] == {
        "requests": 7,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    bot_usage = await admin_get(bare_stack, f"/bots/{bot.id}/usage")
    assert bot_usage["requests"] == 8
    assert bot_usage["total_tokens"] == (prompt + completion + body["usage"]["totalTokens"])


async def test_a_retried_job_is_counted_once(bare_stack: Stack, processes: ProcessFactory) -> None:
    up = bare_stack.upstream
    up.script(Script(hold_after=0))  # the first worker dies holding the job
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    bot, key = await bare_stack.bot_and_key(endpoint="fake", model="m")
    doomed = await processes("worker")

    ask = {"messages": [{"role": "user", "content": "once"}]}
    (status, body, _), _ = await asyncio.gather(
        chat(bare_stack.http, bare_stack.url, key, ask),
        replace_worker_when_called(up, processes, doomed),
    )
    assert status == 200
    assert len(up.requests) == 2  # the model was called twice...
    usage = await admin_get(bare_stack, f"/bots/{bot.id}/usage")
    assert usage["requests"] == 1  # ...the request counts once
    assert usage["total_tokens"] == body["usage"]["totalTokens"]


async def test_a_caller_who_hangs_up_pays_for_what_it_was_sent(bare_stack: Stack) -> None:
    up = bare_stack.upstream
    words = [f"w{i} " for i in range(60)]
    up.script(Script(tokens=words, hold_after=58))  # the model stalls before the 59th word
    await bare_stack.add_worker()
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    bot = await bare_stack.registry.create_bot(name="b", endpoint="fake", model="m")
    key, record = await bare_stack.registry.create_key(bot.id, "k", limits=Limits(tpm=600))
    ask = {"stream": True, "messages": [{"role": "user", "content": "tell me sixty words"}]}
    resp = await bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ask, headers=auth(key)
    )
    assert resp.status == 200
    received = ""
    async for event in sse_events(resp):
        assert isinstance(event, dict)
        assert event["status"] in ("START", "MIDDLE")
        received += event["choices"]["delta"]["content"]
        if received == "".join(words[:58]):
            break
    resp.close()  # hang up just before the end
    await asyncio.wait_for(up.requests[0].disconnected.wait(), 5)

    # The prompt's estimate (4 words + 6) and the 58 words relayed, counted once.
    expected = {"requests": 1, "prompt_tokens": 10, "completion_tokens": 58, "total_tokens": 68}
    async with asyncio.timeout(5):
        # Counted once the gateway noticed the hang-up: poll until it did.
        while (await admin_get(bare_stack, f"/keys/{record.key_id}/usage"))["requests"] == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert await admin_get(bare_stack, f"/keys/{record.key_id}/usage") == expected
    # The key's tokens-per-minute budget paid the same 68 (give or take what
    # a second or two of the budget's refill, 10 tokens a second, paid back,
    # and up to the next request's own reservation of 7 + 1).
    status, _, headers = await chat(
        bare_stack.http,
        bare_stack.url,
        key,
        {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200
    assert 600 - 68 - 8 <= int(headers["x-ratelimit-remaining-tokens"]) <= 600 - 68 + 20
