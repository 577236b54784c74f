"""Workers that die: before the first delta nobody notices, after it one clean error."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.support.client import auth, chat, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import ProcessFactory, Stack, replace_worker_when_called

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "tell me a story"}]}


async def test_worker_killed_before_first_delta_is_invisible(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    up = bare_stack.upstream
    # The first attempt's model call hangs before sending anything.
    up.script(Script(tokens=["never ", "sent"], hold_after=0))
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
    doomed = await processes("worker")

    answer, _ = await asyncio.gather(
        chat(bare_stack.http, bare_stack.url, key, ASK),
        replace_worker_when_called(up, processes, doomed),
    )
    status, body, _ = answer
    assert status == 200, body
    assert body["choices"]["message"]["content"] == "fake reply to: tell me a story"
    second = await up.wait_request(2)
    assert second.body["messages"] == up.requests[0].body["messages"]


async def test_worker_killed_after_first_delta_ends_the_stream_with_one_error(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    up = bare_stack.upstream
    up.script(Script(tokens=["once ", "upon ", "a ", "time"], hold_after=2))
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
    doomed = await processes("worker")
    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        events = sse_events(resp)
        first = await anext(events)
        assert isinstance(first, dict)
        assert first["status"] == "START"
        doomed.signal(signal.SIGKILL)
        await doomed.wait()
        await processes("worker")  # takes the redelivered job: attempt 2
        rest = [e async for e in events]
    everything = [first, *rest]
    statuses = [e["status"] for e in everything if isinstance(e, dict)]
    assert statuses[-1] == "ERROR"
    assert statuses.count("ERROR") == 1
    assert "END" not in statuses
    error = everything[-1]
    assert isinstance(error, dict)
    assert error["error"]["code"] == "worker_lost"
    text = "".join(
        e["choices"]["delta"]["content"]
        for e in everything
        if isinstance(e, dict) and "choices" in e
    )
    assert text in ("once ", "once upon ")  # no text twice, nothing after the error


async def test_a_job_that_kills_every_worker_is_dead_lettered(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    up = bare_stack.upstream
    limit = 2
    for _ in range(limit + 1):
        up.script(Script(hold_after=0))
    await bare_stack.add_gateway(jobs_delivery_limit=limit)
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")

    async def keep_killing() -> None:
        for n in range(1, limit + 2):
            worker = await processes("worker", BOTLINE_JOBS_DELIVERY_LIMIT=str(limit))
            await up.wait_request(n)
            worker.signal(signal.SIGKILL)
            await worker.wait()
        # The next worker to be given the job buries it instead of running it.
        await processes("worker", BOTLINE_JOBS_DELIVERY_LIMIT=str(limit))

    answer, _ = await asyncio.gather(
        chat(bare_stack.http, bare_stack.url, key, ASK), keep_killing()
    )
    status, body, _ = answer
    assert (status, body["error"]["code"]) == (502, "job_failed")
    assert len(up.requests) == limit + 1


async def test_a_dead_gateway_stops_its_jobs_on_the_workers(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    """The reply queue vanishes with its gateway; the worker's next delta bounces and stops it."""
    from tests.support.stack import free_port

    up = bare_stack.upstream
    script = Script(tokens=[f"t{i} " for i in range(40)], hold_after=1, delay_s=0.05)
    up.script(script)
    await bare_stack.add_worker()
    port = free_port()
    gateway = await processes("gateway", "--port", str(port))
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
    async with bare_stack.http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json=ASK | {"stream": True},
        headers=auth(key),
    ) as resp:
        events = sse_events(resp)
        assert (await anext(events))["status"] == "START"  # type: ignore[index]
        gateway.signal(signal.SIGKILL)
        await gateway.wait()
    script.release.set()  # the model goes on; its next delta finds no reply queue
    recorded = up.requests[-1]
    async with asyncio.timeout(10):
        await recorded.disconnected.wait()
    await bare_stack.workers[0].stats.wait_for("cancelled", 1)
