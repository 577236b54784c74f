"""Tests for tests.support.fake_openai, driven through a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fake_openai import FakeOpenAI, Script

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]
REPLY = "fake reply to: hello there"


@pytest.fixture
async def up() -> AsyncIterator[FakeOpenAI]:
    """A started fake server, closed after the test."""
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with a default timeout so a broken test cannot hang."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def chat(**extra: Any) -> dict[str, Any]:
    """A chat-completions request body."""
    return {"model": "m1", "messages": MESSAGES, **extra}


async def next_event(resp: aiohttp.ClientResponse) -> Any:
    """Return the next SSE data payload: parsed JSON, "[DONE]", or None at end of body."""
    while line := await resp.content.readline():
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text.removeprefix("data: ")
            return data if data == "[DONE]" else json.loads(data)
    return None


async def all_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Read SSE payloads until the body ends."""
    events = []
    while (event := await next_event(resp)) is not None:
        events.append(event)
    return events


async def post_json(
    session: aiohttp.ClientSession, up: FakeOpenAI, body: dict[str, Any]
) -> tuple[int, Any]:
    """POST a non-streaming request and return (status, parsed body)."""
    async with session.post(f"{up.base_url}/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def stream_events(
    session: aiohttp.ClientSession, up: FakeOpenAI, body: dict[str, Any]
) -> list[Any]:
    """POST a streaming request and return all its SSE payloads."""
    async with session.post(f"{up.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        return await all_events(resp)


def contents(events: list[Any]) -> list[str]:
    """The content deltas of the chunks that carry a choice."""
    return [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]


async def test_models(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{up.base_url}/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == "fake-model"


async def test_non_stream_default_reply(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    headers = {"Authorization": "Bearer sk-test"}
    async with session.post(f"{up.base_url}/chat/completions", json=chat(), headers=headers) as r:
        assert r.status == 200
        data = await r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m1"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}

    rec = await up.wait_request(1, timeout=5)
    assert rec.body == chat()
    assert rec.headers["Authorization"] == "Bearer sk-test"
    assert rec.started.is_set()
    await asyncio.wait_for(rec.finished.wait(), 5)
    assert not rec.disconnected.is_set()


async def test_stream_with_usage(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    events = await stream_events(
        session, up, chat(stream=True, stream_options={"include_usage": True})
    )
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [
        "fake ",
        "reply ",
        "to: ",
        "hello ",
        "there",
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


async def test_stream_without_usage(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    events = await stream_events(session, up, chat(stream=True))
    assert "".join(contents(events)) == REPLY
    assert all(e["choices"] and "usage" not in e for e in events[:-1])

    # The script can refuse usage even when the client asks for it.
    up.script(Script(include_usage=False))
    asked = chat(stream=True, stream_options={"include_usage": True})
    events = await stream_events(session, up, asked)
    assert all(e["choices"] and "usage" not in e for e in events[:-1])
    up.script(Script(include_usage=False))
    _, data = await post_json(session, up, chat())
    assert "usage" not in data


async def test_scripts_are_fifo_then_default(
    up: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    up.script(Script(tokens=["a", "b c", "!"]))
    up.script(Script(tokens=[]))
    events = await stream_events(session, up, chat(stream=True))
    assert contents(events) == ["a", "b c", "!"]
    events = await stream_events(session, up, chat(stream=True))
    assert contents(events) == [""]
    assert events[0]["choices"][0]["finish_reason"] == "stop"
    _, data = await post_json(session, up, chat())
    assert data["choices"][0]["message"]["content"] == REPLY


async def test_status_error(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    up.script(Script(status=429))
    status, data = await post_json(session, up, chat(stream=True))
    assert status == 429
    assert data["error"]["type"] == "requests"
    assert data["error"]["code"] == "rate_limit_exceeded"
    assert data["error"]["message"]
    up.script(Script(status=503))
    status, data = await post_json(session, up, chat())
    assert (status, data["error"]["type"]) == (503, "server_error")


async def test_max_tokens(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    _, data = await post_json(session, up, chat(max_tokens=2))
    assert data["choices"][0]["message"]["content"] == "fake reply "
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2

    body = chat(stream=True, max_tokens=3, stream_options={"include_usage": True})
    events = await stream_events(session, up, body)
    assert contents(events) == ["fake ", "reply ", "to: "]
    assert events[2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 3


async def test_tool_calls(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    calls = [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"x": 1}'}},
    ]
    up.script(Script(tool_calls=calls))
    events = await stream_events(session, up, chat(stream=True))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert [d["tool_calls"] for d in deltas] == [[calls[0]], [calls[1]]]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"

    up.script(Script(tool_calls=calls))
    _, data = await post_json(session, up, chat())
    assert data["choices"][0]["message"]["tool_calls"] == calls
    assert data["choices"][0]["finish_reason"] == "tool_calls"


async def test_hold_after_and_release(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    script = Script(tokens=["a", "b", "c"], hold_after=2)
    up.script(script)
    async with session.post(f"{up.base_url}/chat/completions", json=chat(stream=True)) as resp:
        assert [(await next_event(resp))["choices"][0]["delta"]["content"] for _ in "ab"] == [
            "a",
            "b",
        ]
        # Read in a task rather than wait_for(): cancelling a read could lose a partial line.
        reading = asyncio.create_task(next_event(resp))
        done, _ = await asyncio.wait({reading}, timeout=0.2)
        assert not done
        script.release.set()
        assert (await asyncio.wait_for(reading, 5))["choices"][0]["delta"]["content"] == "c"
        assert await all_events(resp) == ["[DONE]"]
    rec = await up.wait_request()
    await asyncio.wait_for(rec.finished.wait(), 5)


async def test_disconnect_mid_stream(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    up.script(Script(hold_after=1))
    resp = await session.post(f"{up.base_url}/chat/completions", json=chat(stream=True))
    assert (await next_event(resp))["choices"][0]["delta"]["content"] == "fake "
    resp.close()  # drops the connection instead of returning it to the pool
    rec = await up.wait_request()
    await asyncio.wait_for(rec.disconnected.wait(), 5)
    assert not rec.finished.is_set()


async def test_wait_request_and_close_cut_held_requests(session: aiohttp.ClientSession) -> None:
    up = FakeOpenAI()
    await up.start()
    up.script(Script(hold_after=0))
    body = chat(stream=True)
    call = asyncio.create_task(stream_events(session, up, body))
    rec = await up.wait_request(1, timeout=5)
    assert rec.started.is_set()
    with pytest.raises(TimeoutError):
        await up.wait_request(2, timeout=0.1)
    # close() must not wait out aiohttp's shutdown timeout for the held handler.
    await asyncio.wait_for(up.close(), 5)
    with pytest.raises(aiohttp.ClientError):
        await call
    assert not rec.finished.is_set()


async def test_bad_body_is_400(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{up.base_url}/chat/completions", data=b"[") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert up.requests == []


async def test_standalone_process(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.fake_openai",
        "--port",
        "0",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        base_url = line.split()[-1]
        async with session.post(f"{base_url}/chat/completions", json=chat()) as resp:
            data = await resp.json()
        assert data["choices"][0]["message"]["content"] == REPLY
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0


async def test_retry_after_and_stall(up: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    up.script(Script(status=429, retry_after=2.5))
    async with session.post(f"{up.base_url}/chat/completions", json=chat()) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (429, "2.5")
    up.script(Script(stall_s=0.3))
    started = asyncio.get_running_loop().time()
    async with session.post(f"{up.base_url}/chat/completions", json=chat(stream=True)) as resp:
        assert resp.status == 200  # the head itself came only after the stall
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert contents(await all_events(resp))


async def test_rate_limit_answers_429_past_the_accounts_limit(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeOpenAI(rate_limit=(2, 30.0)) as limited:
        statuses = []
        for _ in range(3):
            async with session.post(f"{limited.base_url}/chat/completions", json=chat()) as resp:
                statuses.append((resp.status, resp.headers.get("Retry-After")))
        assert [s for s, _ in statuses] == [200, 200, 429]
        assert 29 < float(statuses[2][1] or 0) <= 30
        assert (limited.accepted, limited.rate_limited) == (2, 1)
        async with session.get(limited.base_url.removesuffix("/v1") + "/stats") as resp:
            assert await resp.json() == {"accepted": 2, "rate_limited": 1}
