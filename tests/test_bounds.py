"""Bounds before work: depth, counts and history are checked before anything costly."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.support.stack import Stack

pytestmark = pytest.mark.integration

OPENAI = "/openai/v1/chat/completions"
USER = {"role": "user", "content": "hi"}


def nested(levels: int) -> bytes:
    """JSON text ``levels`` arrays deep (written out: encoders stop far sooner)."""
    return b"[" * levels + b"]" * levels


def tools_body(depth: int) -> bytes:
    """An OpenAI body whose deepest point is ``depth`` levels (the body itself is 1)."""
    # body (1) > tools (2) > tool (3) > function (4) > parameters (5) > nested arrays
    return (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type":'
        b' "function", "function": {"name": "f", "parameters": {"type": "object", "x": '
        + nested(depth - 5)
        + b"}}}]}"
    )


def assert_400(result: tuple[int, Any, Any], param: str | None, words: str) -> None:
    status, body, _ = result
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == param
    assert words in body["error"]["message"]


async def test_json_deeper_than_64_is_a_400_before_any_job(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    deepest = orjson.loads(tools_body(64))["tools"][0]["function"]["parameters"]["x"]
    for _ in range(64 - 5):  # the depth is what it says
        (deepest,) = deepest or [None]
    assert deepest is None
    status, _, _ = await stack.chat(key, tools_body(64), path=OPENAI)
    assert status == 200
    assert len(stack.upstream.requests) == 1
    # 250 deep used to pass the gateway and die in the worker (502, dead-lettered);
    # 400 deep was a 500 with a traceback; 2000 deep is past the parser's own limit.
    for depth in (65, 250, 400, 2000):
        result = await stack.chat(key, tools_body(depth), path=OPENAI)
        assert_400(result, None, "nests deeper than 64 levels")
    seed = b'{"messages": [{"role": "user", "content": "hi"}], "model": ' + nested(300) + b"}"
    assert_400(await stack.chat(key, seed), None, "nests deeper than 64 levels")
    assert len(stack.upstream.requests) == 1


async def test_message_and_content_part_counts_are_capped(stack: Stack) -> None:
    _, key = await stack.bot_and_key()
    many = [USER] * 2049
    for path in ("/v1/chat/completions", OPENAI):
        assert_400(await stack.chat(key, {"messages": many}, path=path), "messages", "2048")
        assert (await stack.chat(key, {"messages": many[:2048]}, path=path))[0] == 200
    part = {"type": "text", "text": "a "}
    for count, status in ((257, 400), (256, 200)):
        parts = {"messages": [USER, {"role": "user", "content": [part] * count}]}
        result = await stack.chat(key, parts, path=OPENAI)
        if status == 400:
            assert_400(result, "messages[1].content", "256")
        assert result[0] == status
    # Arrays and objects in all: parsing allocates one each.
    crowd = {"messages": [USER], "model": [[] for _ in range(20_000)]}
    assert_400(await stack.chat(key, crowd), None, "more than 20000 arrays and objects")


async def test_only_the_kept_history_is_validated_and_errors_name_the_body_index(
    stack: Stack,
) -> None:
    _, key = await stack.bot_and_key(max_history_messages=3)
    broken = {"role": "robot", "content": "?"}
    for path in ("/v1/chat/completions", OPENAI):
        # Message 0 is never sent to the model: the bot keeps the last 3.
        body = {"messages": [broken, USER, USER, USER]}
        assert (await stack.chat(key, body, path=path))[0] == 200
        # Within the kept ones, the error names the message by its index in the body.
        body = {"messages": [USER, USER, broken, USER]}
        assert_400(await stack.chat(key, body, path=path), "messages[2].role", "messages[2].role")
