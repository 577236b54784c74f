"""The answer goes out before the bookkeeping: what the caller waits for is written first.

The gateway writes a whole answer before it settles the request (usage, limits,
the log line, the metrics); the worker acks a job in the same write as its last
event, before the job's metrics and log line. Both keep that work off the
caller's path (docs/performance.md, eleventh pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any, cast

import aio_pika
import aiohttp
import aiormq
import pytest
import structlog

from services.worker import worker as worker_module
from services.worker.endpoints import Finish
from services.worker.job_events import JobEvents
from shared.amqp import ack_delivery
from shared.errors import DeadlineExceeded
from shared.settings import CommonSettings
from shared.wire import Usage
from tests.support.client import auth, sse_events
from tests.support.samples import JOB
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hi"}]}


def fail_settling(stack: Stack) -> list[str]:
    """Make the gateway's usage book raise as a request is settled; returns the calls."""
    calls: list[str] = []

    def record(key_id: str, bot_id: str, usage: Usage | None) -> None:
        calls.append(key_id)
        raise RuntimeError("the usage book failed")

    stack.gateway().usage.record = record  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("surface", ["/v1/chat/completions", "/openai/v1/chat/completions"])
async def test_a_whole_answer_is_written_before_the_request_is_settled(
    stack: Stack, surface: str
) -> None:
    """A failure while settling costs the caller neither its answer nor its connection:
    the answer was on its way already, and nothing else follows it on the connection."""
    bot, key = await stack.bot_and_key(endpoint="fake", model="m")
    calls = fail_settling(stack)
    body = ASK | {"model": bot.id}
    # One connection for both requests: a second response written after the first
    # would be read as the answer to the next request, or break it.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                async with http.post(f"{stack.url}{surface}", json=body, headers=auth(key)) as r:
                    assert r.status == 200
                    answer = await r.json()
                    assert answer["id"].startswith("chatcmpl-")
    assert len(calls) == 2  # each request was settled, and failed there, after its answer
    lines = [e for e in logs if e["event"] == "http.request"]
    assert [line["status"] for line in lines] == [200, 200]
    assert sum(e["event"] == "http.unhandled" for e in logs) == 2


async def test_a_stream_is_not_followed_by_an_error_response(stack: Stack) -> None:
    """The same for a stream that failed as it was settled (before, an error response
    was written after the stream's end, onto the same connection)."""
    bot, key = await stack.bot_and_key(endpoint="fake", model="m")
    fail_settling(stack)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for stream in (True, False):
            async with http.post(
                f"{stack.url}/openai/v1/chat/completions",
                json=ASK | {"model": bot.id, "stream": stream},
                headers=auth(key),
            ) as resp:
                assert resp.status == 200
                if stream:
                    assert [e async for e in sse_events(resp)][-1] == "[DONE]"
                else:
                    assert (await resp.json())["object"] == "chat.completion"


async def test_a_job_is_acked_before_its_bookkeeping(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's ack is queued right behind its end event, before ``job.finished``."""
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    (worker,) = stack.workers
    assert worker._jobs is not None
    raw = cast(aiormq.Channel, await worker._jobs.channel.get_underlay_channel())
    acks: list[int] = []

    async def counted(channel: aiormq.Channel, delivery_tag: int) -> None:
        assert channel is raw
        acks.append(delivery_tag)
        await ack_delivery(channel, delivery_tag)

    # The worker's one way to ack (shared.amqp.ack_delivery, not aiormq's basic_ack).
    monkeypatch.setattr(worker_module, "ack_delivery", counted)
    monkeypatch.setattr(raw, "basic_ack", None)
    acked_when_logged: list[int] = []
    finished = asyncio.Event()

    def notice(_logger: object, _name: str, event: MutableMapping[str, Any]) -> Any:
        if event["event"] == "job.finished":
            acked_when_logged.append(len(acks))
            finished.set()
        return event

    with structlog.testing.capture_logs(processors=[notice]):
        await _whole(stack, key)
        async with asyncio.timeout(5):
            await finished.wait()
    assert acked_when_logged == [1]
    assert len(acks) == 1  # and once only: settling the message again does nothing


async def _whole(stack: Stack, key: str) -> None:
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=ASK, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        await resp.read()


async def test_nothing_follows_a_jobs_end(namespace: str) -> None:
    """The ack behind the end may wait for the socket past the job's deadline; the
    deadline's error must not follow the end the caller already has."""
    connection = await aio_pika.connect(CommonSettings().amqp_urls[0])
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{namespace}.events", exclusive=True)
        acks: list[str] = []

        async def ack() -> None:
            acks.append("ack")

        job = JOB.model_copy(update={"reply_to": queue.name})
        events = JobEvents(channel, "", job, 1, on_terminal=ack)
        await events.end("the answer", Finish("stop", Usage()))
        await events.error(DeadlineExceeded("the request deadline passed"))
        # Published on this channel before each get, so in the queue before it: RabbitMQ
        # keeps a channel's commands in order, up to the queue.
        first = await queue.get(no_ack=True, timeout=5)
        after = await queue.get(no_ack=True, fail=False, timeout=5)
    assert first.type == "chat.end"
    assert after is None
    assert acks == ["ack"]
