"""The scheduler's series on /metrics (issue 14, item 7): endpoint state,
cooldowns, budget waits, per-priority queue wait. Real Redis and RabbitMQ,
a fake model server."""

from __future__ import annotations

import pytest

from services.worker.probes import serve_probes
from services.worker.settings import EndpointConfig
from tests.support import stack as stack_support
from tests.support.fake_openai import Script
from tests.support.metrics import scrape
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hi"}]}


async def test_endpoint_state_cooldowns_and_queue_wait_are_served(bare_stack: Stack) -> None:
    stack = bare_stack
    endpoints = stack_support.test_endpoints(stack.upstream_url) | {
        # Opens at its first failure, for a minute; declares capacity.
        "flaky": EndpointConfig(
            kind="openai",
            base_url=stack.upstream_url,
            timeout_s=10,
            cooldown_failures=1,
            cooldown_s=60,
            max_in_flight=4,
        ),
    }
    worker = await stack.add_worker(worker_http_port=0, endpoints=endpoints)
    await stack.add_gateway()
    _, key = await stack.bot_and_key(endpoint="flaky", priority="low")
    async with serve_probes(worker.settings, worker, worker.metrics) as base:
        before = await scrape(stack.http, base)
        assert before.value("botline_endpoint_state", endpoint="flaky", state="closed") == 1
        assert before.value("botline_endpoint_state", endpoint="flaky", state="open") == 0
        assert (await stack.chat(key, ASK))[0] == 200
        stack.upstream.script(Script(status=500))
        status, body, _ = await stack.chat(key, ASK)
        assert status in (502, 503), body
        after = await scrape(stack.http, base)
    assert after.value("botline_endpoint_state", endpoint="flaky", state="open") == 1
    assert after.value("botline_endpoint_state", endpoint="flaky", state="closed") == 0
    assert 50 < after.value("botline_endpoint_cooldown_remaining_seconds", endpoint="flaky") <= 60
    assert after.value("botline_cooldowns_opened_total") == 1
    calls = "botline_endpoint_calls_total"
    assert after.value(calls, endpoint="flaky", outcome="answered") == 1
    assert after.value(calls, endpoint="flaky", outcome="failed") == 1
    assert after.value("botline_endpoint_fleet_in_flight", endpoint="flaky") == 0
    assert "botline_budget_wait_seconds_total" in after.names()
    gateway = await scrape(stack.http, stack.url)
    wait = "botline_queue_wait_by_priority_seconds_count"
    # Both jobs were the low bot's: their queue wait is counted under low.
    assert gateway.value(wait, priority="low") == 2
