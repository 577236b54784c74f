"""The seed page's three requests get the seed page's shapes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.client import auth, chat, sse_events, stream_chat
from tests.support.fake_openai import Script
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

SEED_1 = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello, how are you?"}]}
SEED_2 = SEED_1 | {"max_tokens": 500, "temperature": 0.7, "stream": False}
SEED_3 = {
    "stream": True,
    "messages": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好我是科大讯飞模型"},
        {"role": "user", "content": "你叫什么名字? tell me more about you"},
    ],
}


def _is_ms(value: Any) -> bool:
    now_ms = time.time() * 1000
    return isinstance(value, int) and abs(value - now_ms) < 60_000


def assert_whole(body: dict[str, Any], content: str) -> None:
    """The seed's non-stream shape, field by field."""
    assert body["status"] == "END"
    assert _is_ms(body["created"])
    usage = body["usage"]
    assert set(usage) == {"completionTokens", "promptTokens", "totalTokens"}
    assert all(isinstance(v, int) for v in usage.values())
    assert usage["totalTokens"] == usage["completionTokens"] + usage["promptTokens"]
    assert isinstance(body["choices"], dict)
    assert body["choices"] == {"index": 0, "message": {"content": content, "role": "assistant"}}


@pytest.mark.parametrize("request_body", [SEED_1, SEED_2], ids=["seed-1", "seed-2"])
async def test_whole_answer_has_the_seed_shape(stack: Stack, request_body: dict[str, Any]) -> None:
    _, key = await stack.bot_and_key()
    status, body, headers = await chat(stack.http, stack.url, key, request_body)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"]
    assert_whole(body, "Hello, how are you?")
    assert body["usage"]["completionTokens"] == 4


async def test_stream_is_start_middle_end_with_usage_and_no_done(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="echo-slow")
    events = await stream_chat(stack.http, stack.url, key, SEED_3)
    assert "[DONE]" not in events
    statuses = [e["status"] for e in events if isinstance(e, dict)]
    assert statuses[0] == "START"
    assert statuses[-1] == "END"
    assert set(statuses[1:-1]) == {"MIDDLE"}
    text = ""
    for event in events:
        assert isinstance(event, dict)
        assert _is_ms(event["created"])
        assert isinstance(event["choices"], dict)
        assert event["choices"]["index"] == 0
        delta = event["choices"]["delta"]
        assert delta["role"] == "assistant"
        assert isinstance(delta["content"], str)
        text += delta["content"]
    assert text == "你叫什么名字? tell me more about you"
    end = events[-1]
    assert isinstance(end, dict)
    assert end["usage"]["completionTokens"] == 6
    assert set(end["usage"]) == {"completionTokens", "promptTokens", "totalTokens"}
    assert "usage" not in events[0]


async def test_one_piece_answer_is_start_then_end(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    body = {"messages": [{"role": "user", "content": "single"}]}
    events = await stream_chat(stack.http, stack.url, key, body)
    assert [e["status"] for e in events if isinstance(e, dict)] == ["START", "END"]
    assert "".join(e["choices"]["delta"]["content"] for e in events if isinstance(e, dict)) == (
        "single"
    )


async def test_answers_from_an_openai_compatible_upstream(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="fake-model")
    status, body, _ = await chat(stack.http, stack.url, key, SEED_1)
    assert status == 200
    assert_whole(body, "fake reply to: Hello, how are you?")
    events = await stream_chat(stack.http, stack.url, key, SEED_3)
    text = "".join(e["choices"]["delta"]["content"] for e in events if isinstance(e, dict))
    assert text == "fake reply to: 你叫什么名字? tell me more about you"


async def test_stream_is_relayed_as_it_comes(stack: Stack) -> None:
    """The first event reaches the caller while the model is still holding the rest."""
    _, key = await stack.bot_and_key(endpoint="fake", model="fake-model")
    upstream_script = Script(tokens=["one ", "two ", "three"], hold_after=1)
    stack.upstream.script(upstream_script)
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions",
        json={"stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers=auth(key),
    ) as resp:
        events = sse_events(resp)
        first = await anext(events)
        assert isinstance(first, dict)
        assert first["status"] == "START"
        assert first["choices"]["delta"]["content"] == "one "
        upstream_script.release.set()
        rest = [e async for e in events]
    assert [e["status"] for e in rest if isinstance(e, dict)][-1] == "END"
    assert "".join(e["choices"]["delta"]["content"] for e in rest if isinstance(e, dict)) == (
        "two three"
    )
