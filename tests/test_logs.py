"""No key and no message body ever reaches a log, whatever happens."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from shared.keys import hash_key
from tests.support.client import auth, chat, raw_request, sse_events, stream_chat
from tests.support.fake_openai import Script
from tests.support.stack import ProcessFactory, Stack, free_port, run_cli

pytestmark = pytest.mark.integration

SECRET_WORDS = "zebra-umbrella-7731 quantum marmalade"
SECRET_REPLY = "confidential-reply-4412"


async def cli(namespace: str, upstream_url: str, *args: str) -> tuple[str, str]:
    return await run_cli(namespace, *args, upstream_url=upstream_url)


def read_logs(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("*.log"))


async def test_logs_hold_no_key_and_no_message_content(
    bare_stack: Stack, processes: ProcessFactory, tmp_path: Path
) -> None:
    ns, up = bare_stack.namespace, bare_stack.upstream
    port = free_port()
    await processes("worker")
    await processes("gateway", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    out, _ = await cli(ns, up.base_url, "bots", "create", "--name", "b", "--endpoint", "fake",
                       "--model", "m", "--system-prompt", "secret prompt 9931")  # fmt: skip
    bot_id = out.split('"id": "')[1].split('"')[0]
    key, _ = await cli(ns, up.base_url, "keys", "create", "--bot", bot_id, "--name", "k")
    key = key.strip()
    assert key.startswith("bl-")

    ask = {"messages": [{"role": "user", "content": SECRET_WORDS}]}
    status, body, _ = await chat(bare_stack.http, url, key, ask)
    assert status == 200
    assert SECRET_WORDS in body["choices"]["message"]["content"]
    up.script(Script(tokens=[SECRET_REPLY, " done"]))
    events = await stream_chat(bare_stack.http, url, key, ask)
    assert events
    # Errors that carry content or keys: a bad body, a bad key, a failing model.
    async with bare_stack.http.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": SECRET_WORDS, "content": SECRET_WORDS}]},
        headers=auth(key),
    ) as resp:
        assert resp.status == 400
    tampered = key[:-2] + "zz"
    assert (await chat(bare_stack.http, url, tampered, ask))[0] == 401
    up.script(Script(status=500))
    assert (await chat(bare_stack.http, url, key, ask))[0] == 502

    logs = await asyncio.to_thread(read_logs, tmp_path)
    assert "http.request" in logs
    assert "job.finished" in logs
    for secret in (key, tampered, key[3:], hash_key(key), SECRET_WORDS, "zebra", SECRET_REPLY,
                   "secret prompt"):  # fmt: skip
        assert secret not in logs, f"{secret[:8]}… leaked into a log"


async def test_malformed_and_oversized_requests_echo_and_log_no_key(
    bare_stack: Stack, processes: ProcessFactory, tmp_path: Path
) -> None:
    """aiohttp's parser errors quote the offending line: neither the answer nor the log may."""
    port = free_port()
    await processes("gateway", "--port", str(port))
    _, key = await bare_stack.bot_and_key()
    body = orjson.dumps({"messages": [{"role": "user", "content": SECRET_WORDS}]})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    tail = b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    bearer = b"Authorization: Bearer " + key.encode()
    malformed = [
        head + bearer + b"\x01\r\n" + tail,  # a control byte in a header value
        head + bearer + b"\r\nX-Note: " + key.encode() + b"\x00\r\n" + tail,
        head + bearer + b"\r\nX-Pad: " + key.encode() + b"a" * 9000 + b"\r\n" + tail,  # too long
        b"GET /v1/" + key.encode() + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad request line
        head + bearer + b"\r\nContent-Length: 5\r\n" + tail,  # two lengths
    ]
    for request in malformed:
        answer = await raw_request(f"http://127.0.0.1:{port}", request)
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, payload = rest.partition(b"\r\n\r\n")
        assert status_line.split()[1] == b"400", status_line
        assert orjson.loads(payload)["error"]["code"] == "invalid_request"
        assert b"application/json" in headers
        assert b"aiohttp" not in headers.lower()  # nor a version in Server (item 12)
        for secret in (key.encode(), key[3:20].encode(), SECRET_WORDS.encode(), b"Authorization"):
            assert secret not in answer, f"{secret[:8]!r}… echoed in a 400"

    # Bodies over the limit, announced and not announced (chunked).
    too_big = b'{"messages":[{"role":"user","content":"' + SECRET_WORDS.encode() * 40_000 + b'"}]}'
    async with bare_stack.http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=io.BytesIO(too_big),
        headers={**auth(key), "Content-Type": "application/json"},
    ) as resp:  # fmt: skip
        assert resp.status == 413
        assert SECRET_WORDS not in await resp.text()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(too_big), 65536):
            yield too_big[start : start + 65536]

    async with bare_stack.http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=chunks(), headers=auth(key)
    ) as resp:
        assert resp.status == 413

    logs = await asyncio.to_thread(read_logs, tmp_path)
    assert "http.malformed" in logs
    for line in logs.splitlines():
        if line.strip():
            orjson.loads(line)  # every line is one JSON event: no plain-text traceback
    for words in (key, key[3:], key[3:15], hash_key(key), SECRET_WORDS, "zebra"):
        assert words not in logs, f"{words[:8]}… leaked into a log"


async def test_a_stream_that_ended_in_an_error_logs_its_code(stack: Stack) -> None:
    """The one ``http.request`` line of a stream that failed after its 200 names the error."""
    stack.upstream.script(Script(tokens=["a ", "b ", "c"], hold_after=1))
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    logged = asyncio.Event()

    def notice(_logger: object, _name: str, event: MutableMapping[str, Any]) -> Any:
        if event["event"] == "http.request":
            logged.set()
        return event

    with structlog.testing.capture_logs(processors=[notice]) as logs:
        async with stack.http.post(
            f"{stack.url}/v1/chat/completions",
            json={"stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(key),
        ) as resp:
            events = sse_events(resp)
            assert (await anext(events))["status"] == "START"  # type: ignore[index]
            await stack.upstream.close()  # the model server dies mid-answer
            rest = [e async for e in events]
        # The line is written as the handler returns, which may follow the last byte.
        async with asyncio.timeout(5):
            await logged.wait()
    assert rest[-1]["error"]["code"] == "upstream_error"  # type: ignore[index]
    (line,) = [e for e in logs if e["event"] == "http.request"]
    assert (line["status"], line["code"]) == (200, "upstream_error")
