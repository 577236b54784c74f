"""/openai/v1 with the official SDKs: Python (sync and async) and Node."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from tests.support.fake_openai import Script
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.integration

HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# How OpenAI streams one tool call: the id and name first, the arguments in pieces.
TOOL_CALL_CHUNKS = [
    {"index": 0, "id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city":'}},
    {"index": 0, "function": {"arguments": ' "Paris"}'}},
]  # fmt: skip


def clients(stack: Stack, key: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    base = f"{stack.url}/openai/v1"
    return (
        openai.OpenAI(base_url=base, api_key=key, max_retries=0),
        openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0),
    )


async def test_whole_answer_sync_and_async(stack: Stack) -> None:
    bot, key = await stack.bot_and_key(endpoint="fake", model="m")
    sync, aio = clients(stack, key)
    with sync:
        done = await asyncio.to_thread(sync.chat.completions.create, model=bot.id, messages=HELLO)
    async with aio:
        adone = await aio.chat.completions.create(model="whatever", messages=HELLO)
    for completion in (done, adone):
        assert completion.id.startswith("chatcmpl-")
        assert completion.object == "chat.completion"
        assert completion.model == bot.id
        assert abs(completion.created - time.time()) < 60  # seconds, not milliseconds
        choice = completion.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == "fake reply to: hello there"
        assert choice.finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 5
        assert completion.usage.total_tokens == (
            completion.usage.prompt_tokens + completion.usage.completion_tokens
        )


async def test_stream_without_and_with_usage(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    _, aio = clients(stack, key)
    async with aio:
        chunks = [c async for c in await aio.chat.completions.create(
            model="m", messages=HELLO, stream=True)]  # fmt: skip
        with_usage = [c async for c in await aio.chat.completions.create(
            model="m", messages=HELLO, stream=True,
            stream_options={"include_usage": True})]  # fmt: skip
    for stream in (chunks, with_usage):
        assert all(c.object == "chat.completion.chunk" for c in stream)
        assert len({c.id for c in stream}) == 1
        with_choices = [c for c in stream if c.choices]
        assert with_choices[0].choices[0].delta.role == "assistant"
        assert with_choices[-1].choices[0].finish_reason == "stop"
        assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        assert text == "fake reply to: hello there"
    assert all(c.usage is None for c in chunks)
    assert not with_usage[-1].choices
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in with_usage[:-1])


async def test_stream_is_sse_ending_in_done(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    async with stack.http.post(
        f"{stack.url}/openai/v1/chat/completions",
        json={"model": "x", "messages": HELLO, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        body = await resp.text()
    assert body.endswith("data: [DONE]\n\n")
    assert body.count("data: [DONE]") == 1


async def test_tool_call_round_trip(stack: Stack) -> None:
    up = stack.upstream
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    _, aio = clients(stack, key)
    ask: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    async with aio:
        up.script(Script(tool_calls=TOOL_CALL_CHUNKS))
        stream = await aio.chat.completions.create(
            model="m", messages=ask, tools=[WEATHER_TOOL], tool_choice="auto", stream=True
        )
        streamed = [c async for c in stream]
        up.script(Script(tool_calls=TOOL_CALL_CHUNKS))
        whole = await aio.chat.completions.create(
            model="m", messages=ask, tools=[WEATHER_TOOL], tool_choice="auto"
        )
        # The streamed tool-call deltas are exactly the upstream's.
        relayed = [tc.model_dump(exclude_none=True) for c in streamed if c.choices
                   for tc in c.choices[0].delta.tool_calls or []]  # fmt: skip
        assert relayed == TOOL_CALL_CHUNKS
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
        call = whole.choices[0].message.tool_calls
        assert call is not None
        assert whole.choices[0].finish_reason == "tool_calls"
        assert whole.choices[0].message.content is None
        assert call[0].id == "call_1"
        assert isinstance(call[0], ChatCompletionMessageFunctionToolCall)
        assert call[0].function.name == "get_weather"
        assert call[0].function.arguments == '{"city": "Paris"}'
        assert up.requests[-1].body["tools"] == [WEATHER_TOOL]
        assert up.requests[-1].body["tool_choice"] == "auto"

        # Round trip: the tool's result goes back, the model answers.
        follow_up: list[Any] = [
            *ask,
            whole.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
        up.script(Script(tokens=["It ", "is ", "21."]))
        final = await aio.chat.completions.create(
            model="m", messages=follow_up, tools=[WEATHER_TOOL]
        )
    assert final.choices[0].message.content == "It is 21."
    sent = up.requests[-1].body["messages"]
    assert sent[-2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}


async def test_parameters_pass_through_to_the_model(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="m", max_reply_tokens=64)
    _, aio = clients(stack, key)
    async with aio:
        params: dict[str, Any] = dict(
            stop=["\n\n", "END"],
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            response_format={"type": "json_object"},
            user="user-7",
            logit_bias={"50256": -100},
            tools=[WEATHER_TOOL],
            tool_choice="none",
            parallel_tool_calls=False,
            max_completion_tokens=1000,
            temperature=0.1,
        )
        await aio.chat.completions.create(model="m", messages=HELLO, **params)
    body = stack.upstream.requests[-1].body
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 42
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -0.5)
    assert body["response_format"] == {"type": "json_object"}
    assert body["user"] == "user-7"
    assert body["logit_bias"] == {"50256": -100}
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == "none"
    assert body["parallel_tool_calls"] is False
    assert body["max_tokens"] == 64  # bounded by the bot
    assert body["temperature"] == 0.1
    assert body["model"] == "m"


async def test_errors_raise_the_sdks_typed_exceptions(stack: Stack) -> None:
    bot, key = await stack.bot_and_key()
    _, aio = clients(stack, key)
    _, wrong = clients(stack, "bl-not-a-key")
    async with aio, wrong:
        with pytest.raises(openai.AuthenticationError) as auth_error:
            await wrong.chat.completions.create(model="m", messages=HELLO)
        assert auth_error.value.code == "invalid_api_key"
        with pytest.raises(openai.BadRequestError) as bad:
            await aio.chat.completions.create(model="m", messages=HELLO, n=2)
        assert bad.value.param == "n"
        with pytest.raises(openai.BadRequestError) as bad:
            await aio.chat.completions.create(model="m", messages=[])
        assert bad.value.param == "messages"
        with pytest.raises(openai.NotFoundError):
            await aio.models.retrieve("gpt-4")
        models = [m.id async for m in aio.models.list()]
        assert models == [bot.id]
        assert (await aio.models.retrieve(bot.id)).id == bot.id
        await stack.registry.delete_bot(bot.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await aio.chat.completions.create(model="m", messages=HELLO)
        assert gone.value.code == "bot_not_found"


async def test_failure_mid_stream_raises_in_the_sdk(stack: Stack) -> None:
    script = Script(tokens=["a ", "b ", "c"], hold_after=1)
    stack.upstream.script(script)
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    _, aio = clients(stack, key)
    async with aio:
        stream = await aio.chat.completions.create(model="m", messages=HELLO, stream=True)
        first = await anext(aiter(stream))
        assert first.choices[0].delta.content == "a "
        await stack.upstream.close()
        with pytest.raises(openai.APIError, match="model endpoint"):
            async for _ in stream:
                pass


async def test_seed_surface_is_unchanged_by_the_openai_one(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions",
        json={"messages": HELLO},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        body = await resp.json()
    assert body["status"] == "END"
    assert isinstance(body["choices"], dict)


async def node(stack: Stack, key: str, mode: str) -> dict[str, Any]:
    """Run the Node client script against the stack."""
    assert shutil.which("node"), "Node.js is needed for the Node SDK tests"
    folder = ROOT / "tests" / "node"
    assert (folder / "node_modules" / "openai").is_dir(), "run `make test` (npm ci) first"
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(Path(folder) / "client.mjs"),
        mode,
        env=os.environ | {"BOTLINE_BASE_URL": f"{stack.url}/openai/v1", "BOTLINE_KEY": key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = orjson.loads(out)
    return result


async def test_node_sdk_whole_stream_and_bad_key(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    whole = await node(stack, key, "whole")
    assert whole["object"] == "chat.completion"
    assert whole["content"] == "fake reply to: hello from node"
    assert whole["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 6
    streamed = await node(stack, key, "stream")
    assert streamed["content"] == "fake reply to: hello from node"
    assert streamed["finish_reason"] == "stop"
    assert streamed["usage"]["completion_tokens"] == 6
    assert streamed["chunks"] >= 3
    assert (await node(stack, "bl-wrong", "badkey")) == {
        "raised": "AuthenticationError",
        "status": 401,
    }
