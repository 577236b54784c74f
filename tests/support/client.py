"""Talking to a gateway as a caller does: one chat request, whole or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

SEED_CHAT = "/v1/chat/completions"
OPENAI_CHAT = "/openai/v1/chat/completions"

ChatResult = tuple[int, dict[str, Any], CIMultiDictProxy[str]]


def auth(key: str) -> dict[str, str]:
    """The Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


async def chat(
    http: aiohttp.ClientSession,
    url: str,
    key: str | None,
    body: dict[str, Any] | bytes,
    *,
    path: str = SEED_CHAT,
    headers: dict[str, str] | None = None,
) -> ChatResult:
    """POST a whole chat request; returns status, JSON body and headers.

    ``key`` None sends no Authorization header; a ``bytes`` body is sent as is.
    """
    sent = (auth(key) if key else {}) | (headers or {})
    if isinstance(body, bytes):
        request = http.post(f"{url}{path}", data=body, headers=sent)
    else:
        request = http.post(f"{url}{path}", json=body, headers=sent)
    async with request as resp:
        return resp.status, await resp.json(), resp.headers


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | str]:
    """The ``data:`` payloads of an event stream, parsed (``[DONE]`` stays a string)."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[6:]
                    yield data.decode() if data == b"[DONE]" else orjson.loads(data)


async def stream_chat(
    http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]
) -> list[dict[str, Any] | str]:
    """POST a streamed chat request and collect all its events."""
    async with http.post(
        f"{url}{SEED_CHAT}", json=body | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return [event async for event in sse_events(resp)]


async def until_status(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    want: int,
    *,
    timeout: float,  # noqa: ASYNC109 -- a bound, passed on
    body: dict[str, Any] | None = None,
) -> float:
    """Retry a whole answer until it has status ``want``; returns the seconds it took.

    Polling: nothing tells a caller that a backend came back but asking again.
    """
    ask = body or {"messages": [{"role": "user", "content": "still there?"}]}
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while (await chat(http, url, key, ask))[0] != want:  # noqa: ASYNC110 -- polled with a deadline
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (clients refuse to send some headers); the whole answer.

    The request should ask the server to close (``Connection: close``, or bytes it
    cannot parse), since the answer is read until the connection ends.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
