"""The bench's floor target (bench/floor.py): each caller gets its own answer, via RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import aiohttp
import pytest

from bench.floor import _http_message, front, relay
from bench.procs import free_port
from bench.raw_amqp import properties
from shared.settings import CommonSettings
from tests.support.fake_openai import FakeOpenAI


def test_an_http_message_is_taken_whole_or_not_at_all() -> None:
    message = b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: 7\r\n\r\n{"a":1}'
    buffer = bytearray(message[:-3])
    assert _http_message(buffer) is None
    buffer += message[-3:] + b"GET /ready HTTP/1.1\r\n\r\n"
    assert _http_message(buffer) == (message.split(b"\r\n\r\n")[0], b'{"a":1}')
    assert _http_message(buffer) == (b"GET /ready HTTP/1.1", b"")
    assert buffer == b""


def test_correlation_and_reply_to_are_read_past_the_properties_before_them() -> None:
    # content-type, headers (a 5-byte table), delivery-mode, correlation-id, reply-to
    flags = 0x8000 | 0x2000 | 0x1000 | 0x0400 | 0x0200
    raw = b"\x04json" + b"\x00\x00\x00\x05" + b"\x01abcd" + b"\x01" + b"\x03c-1" + b"\x05reply"
    assert properties(raw, 0, flags) == (b"c-1", b"reply")
    assert properties(b"\x01\x03c-2", 0, 0x1000 | 0x0400) == (b"c-2", b"")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("http", "guarded"), [("raw", False), ("aiohttp", False), ("aiohttp", True)]
)
async def test_every_caller_gets_the_answer_to_its_own_request(http: str, guarded: bool) -> None:
    # Guarded, a confirm misread holds every answer (a timeout here) and an ack with a
    # wrong tag closes the relay's channel (answers stop): both fail this test.
    url = CommonSettings().amqp_urls[0]
    queue = f"benchtest{secrets.token_hex(4)}.jobs"  # auto-deleted with its consumers
    port = free_port()
    async with FakeOpenAI() as upstream:
        endpoint = f"{upstream.base_url}/chat/completions"
        tasks = [asyncio.create_task(relay(url, queue, endpoint, guarded))]
        tasks.append(asyncio.create_task(front(url, queue, port, http, guarded)))
        try:
            async with aiohttp.ClientSession() as session, asyncio.timeout(20):
                while True:  # up once the front listens (it consumes by then)
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)

                async def ask(i: int) -> str:
                    body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                    where = f"http://127.0.0.1:{port}/v1/chat/completions"
                    async with session.post(where, json=body) as resp:
                        assert resp.status == 200
                        answer = await resp.json()
                    content: str = answer["choices"][0]["message"]["content"]
                    return content

                # Many at once, over several connections: answers must not cross.
                answers = await asyncio.gather(*(ask(i) for i in range(40)))
                # ...and again: guarded, the relay's channel is still open after 40 acks.
                answers += await asyncio.gather(*(ask(i) for i in range(40, 50)))
            assert answers == [f"fake reply to: q{i}" for i in range(50)]
            assert len(upstream.requests) == 50
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
