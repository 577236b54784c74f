"""Usage accounting: sums match the answers, retries are counted once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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
