"""Waiting instead of refusing, within bounds (issue 14, item 6).

When every worker is busy a job waits in the queue up to its share of the
deadline (``queue_wait_share``); then it is refused 503 ``overloaded`` with
a ``Retry-After`` computed from how fast this gateway's jobs have been
leaving the queue. Real Redis and RabbitMQ, a fake model server.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from tests.support.client import chat
from tests.support.fake_openai import Script
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hi"}]}


async def test_a_job_waits_its_share_then_is_refused_with_a_measured_retry_after(
    bare_stack: Stack,
) -> None:
    stack = bare_stack
    await stack.add_worker(concurrency=1)
    # Deadline 4 s, a quarter of it in the queue at most: 1 s.
    await stack.add_gateway(request_deadline_s=4, queue_wait_share=0.25)
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    # Five quick answers: five jobs left the queue in the last seconds.
    for _ in range(5):
        assert (await stack.chat(key, ASK))[0] == 200
    # The only slot is held 2.5 s by a job whose upstream stalls.
    stack.upstream.script(Script(stall_s=2.5))
    held = asyncio.create_task(stack.chat(key, ASK))
    await stack.upstream.wait_request(6)
    started = time.perf_counter()
    status, body, headers = await stack.chat(key, ASK)
    waited = time.perf_counter() - started
    assert (status, body["error"]["code"]) == (503, "overloaded"), body
    assert 0.9 < waited < 2.0, waited
    # Six jobs left the queue within the 10 s window: 0.6 a second; one was
    # waiting (this one): 1 / 0.6 s, rounded up.
    assert headers["Retry-After"] == str(math.ceil(1 / 0.6))
    assert (await held)[0] == 200
    # The refused job never reached the model: the broker dropped it.
    assert len(stack.upstream.requests) == 6


async def test_a_job_served_within_its_wait_is_answered(bare_stack: Stack) -> None:
    stack = bare_stack
    await stack.add_worker(concurrency=1)
    # Deadline 8 s, half of it in the queue at most: 4 s.
    await stack.add_gateway(request_deadline_s=8, queue_wait_share=0.5)
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    stack.upstream.script(Script(stall_s=1.5))
    held = asyncio.create_task(stack.chat(key, ASK))
    await stack.upstream.wait_request(1)
    status, _, _ = await chat(stack.http, stack.url, key, ASK | {"stream": False})
    assert status == 200
    assert (await held)[0] == 200
