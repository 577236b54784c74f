"""Prometheus metrics: the right series move with real requests, and no key is ever a label."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import aio_pika
import aiohttp
import pytest

from services.worker.probes import serve_probes
from shared.records import Limits
from tests.support.client import OPENAI_CHAT, auth, sse_events, stream_chat
from tests.support.dashboards import queried_metrics
from tests.support.fake_openai import Script
from tests.support.metrics import Scrape, scrape
from tests.support.stack import AMQP_URL, ProcessFactory, Stack, free_port

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hello there metrics"}]}


DEAD_LETTERS = "botline_worker_dead_letters_total"


async def scrape_until(
    http: aiohttp.ClientSession, base: str, done: Callable[[Scrape], bool]
) -> Scrape:
    """Scrape until ``done`` holds (bounded: a dead-lettered message signals nothing else)."""
    async with asyncio.timeout(10):
        while True:
            scraped = await scrape(http, base)
            if done(scraped):
                return scraped
            await asyncio.sleep(0.05)


async def publish_raw(stack: Stack, body: bytes) -> None:
    """Put a message on the jobs queue as a broken client might."""
    connection = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": "raw"})
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body), routing_key=f"{stack.namespace}.jobs"
        )


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a series grew between two scrapes."""
    return after.value(name, **labels) - before.value(name, **labels)


def assert_no_secrets(scraped: Scrape, *key_ids: str) -> None:
    """No label value is a key id or looks like a key."""
    values = scraped.label_values()
    assert not any("bl-" in v for v in values), sorted(values)
    assert not values & set(key_ids)


async def test_requests_errors_and_key_lookups_move(stack: Stack) -> None:
    bot, key = await stack.bot_and_key()
    (record,) = await stack.registry.list_keys(bot.id)
    before = await scrape(stack.http, stack.url)

    status, body, _ = await stack.chat("bl-not-a-real-key", ASK)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, _, _ = await stack.chat(key, ASK)
    assert status == 200
    status, _, _ = await stack.chat(key, ASK)
    assert status == 200
    status, body, _ = await stack.chat(key, b"{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_request")

    after = await scrape(stack.http, stack.url)
    requests = "botline_requests_total"
    assert moved(before, after, requests, surface="seed", status="401", code="invalid_api_key") == 1
    assert moved(before, after, requests, surface="seed", status="200", code="none") == 2
    assert moved(before, after, requests, surface="seed", status="400", code="invalid_request") == 1
    duration = "botline_request_duration_seconds_count"
    assert moved(before, after, duration, surface="seed", stream="false") == 4
    assert moved(before, after, "botline_queue_wait_seconds_count") == 2
    lookups = "botline_key_cache_lookups_total"
    assert moved(before, after, lookups, result="malformed") == 1
    assert moved(before, after, lookups, result="miss") == 1
    assert moved(before, after, lookups, result="hit") == 2
    assert after.value("botline_jobs_in_flight") == 0
    for backend in ("redis", "amqp", "key_invalidations"):
        assert after.value("botline_backend_up", backend=backend) == 1
    # Process figures come along (CPU per request for sizing), and the loop's lag.
    assert after.value("process_cpu_seconds_total") > 0
    assert "botline_event_loop_lag_seconds" in after.names()
    assert "bot" not in {name for (_, labels) in after.samples for name, _ in labels}
    assert_no_secrets(after, record.key_id)


async def test_a_stream_moves_ttft_and_streams_open_returns_to_zero(stack: Stack) -> None:
    bot, key = await stack.bot_and_key(endpoint="echo-slow")
    (record,) = await stack.registry.list_keys(bot.id)
    before = await scrape(stack.http, stack.url)
    ask = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three four five six"}],
    }
    async with stack.http.post(f"{stack.url}{OPENAI_CHAT}", json=ask, headers=auth(key)) as resp:
        assert resp.status == 200
        events = sse_events(resp)
        first = await anext(events)
        assert isinstance(first, dict)
        during = await scrape(stack.http, stack.url)
        assert during.value("botline_streams_open") == 1
        assert during.value("botline_jobs_in_flight") == 1
        assert (
            moved(before, during, "botline_time_to_first_token_seconds_count", surface="openai")
            == 1
        )
        rest = [e async for e in events]
    assert rest[-1] == "[DONE]"
    after = await scrape(stack.http, stack.url)
    assert after.value("botline_streams_open") == 0
    assert after.value("botline_jobs_in_flight") == 0
    assert (
        moved(before, after, "botline_requests_total", surface="openai", status="200", code="none")
        == 1
    )
    duration = "botline_request_duration_seconds_count"
    assert moved(before, after, duration, surface="openai", stream="true") == 1
    # The stream's first token came before its end.
    ttft = after.value("botline_time_to_first_token_seconds_sum", surface="openai")
    whole = after.value("botline_request_duration_seconds_sum", surface="openai", stream="true")
    assert 0 < ttft < whole
    assert_no_secrets(after, record.key_id)


async def test_a_limit_refusal_is_counted_by_limit(stack: Stack) -> None:
    bot, _ = await stack.bot_and_key()
    key, _ = await stack.registry.create_key(bot.id, "limited", limits=Limits(rpm=1))
    before = await scrape(stack.http, stack.url)
    statuses = [(await stack.chat(key, ASK))[0] for _ in range(2)]
    assert statuses == [200, 429]
    after = await scrape(stack.http, stack.url)
    assert moved(before, after, "botline_limit_refusals_total", limit="rpm") == 1
    assert moved(before, after, "botline_limit_refusals_total", limit="concurrency") == 0
    refused = moved(
        before, after, "botline_requests_total", status="429", code="rate_limit_exceeded"
    )
    assert refused == 1


async def test_bot_ids_are_labels_only_when_asked(bare_stack: Stack) -> None:
    await bare_stack.add_worker()
    plain = await bare_stack.add_gateway()
    labelled = await bare_stack.add_gateway(metrics_bot_labels=True)
    bot, key = await bare_stack.bot_and_key()
    (record,) = await bare_stack.registry.list_keys(bot.id)
    for url in (plain, labelled):
        async with bare_stack.http.post(
            f"{url}/v1/chat/completions", json=ASK, headers=auth(key)
        ) as resp:
            assert resp.status == 200
    with_bots, without = await asyncio.gather(
        scrape(bare_stack.http, labelled), scrape(bare_stack.http, plain)
    )
    assert with_bots.value("botline_requests_total", bot=bot.id, code="none") == 1
    assert without.value("botline_requests_total", code="none") == 1
    assert bot.id not in without.label_values()
    assert_no_secrets(with_bots, record.key_id)


async def test_worker_metrics_move_with_jobs(bare_stack: Stack) -> None:
    stack = bare_stack
    worker = await stack.add_worker(worker_http_port=0)
    await stack.add_gateway()
    bot, key = await stack.bot_and_key(endpoint="fake", model="m")
    _, lost_key = await stack.bot_and_key(endpoint="no-such-endpoint")
    async with serve_probes(worker.settings, worker, worker.metrics) as base:
        before = await scrape(stack.http, base)
        status, body, _ = await stack.chat(key, ASK)
        assert status == 200
        usage = body["usage"]
        events = await stream_chat(stack.http, stack.url, key, ASK)
        assert [e["status"] for e in events if isinstance(e, dict)][-1] == "END"
        stack.upstream.script(Script(status=503))
        status, body, _ = await stack.chat(key, ASK)
        assert (status, body["error"]["code"]) == (502, "upstream_error")
        status, body, _ = await stack.chat(lost_key, ASK)
        assert (status, body["error"]["code"]) == (502, "unknown_endpoint")
        # A message no worker can read is dead-lettered, not retried.
        await publish_raw(stack, b"not a job")
        after = await scrape_until(
            stack.http, base, lambda s: s.value(DEAD_LETTERS, reason="invalid") >= 1
        )
    jobs = "botline_worker_jobs_total"
    assert moved(before, after, jobs, endpoint="fake", outcome="done") == 2
    assert moved(before, after, jobs, endpoint="fake", outcome="upstream_error") == 1
    assert moved(before, after, jobs, endpoint="unknown", outcome="unknown_endpoint") == 1
    assert moved(before, after, "botline_upstream_errors_total", endpoint="fake", status="503") == 1
    assert moved(before, after, "botline_upstream_duration_seconds_count", endpoint="fake") == 3
    ttft = "botline_upstream_time_to_first_token_seconds_count"
    assert moved(before, after, ttft, endpoint="fake") == 1
    tokens = "botline_tokens_total"
    streamed = events[-1]
    assert isinstance(streamed, dict)
    assert moved(before, after, tokens, endpoint="fake", direction="completion") == (
        usage["completionTokens"] + streamed["usage"]["completionTokens"]
    )
    assert moved(before, after, tokens, endpoint="fake", direction="prompt") == (
        usage["promptTokens"] + streamed["usage"]["promptTokens"]
    )
    assert after.value("botline_worker_jobs_in_flight", endpoint="fake") == 0
    assert moved(before, after, "botline_worker_redeliveries_total") == 0
    assert "botline_event_loop_lag_seconds" in after.names()
    assert_no_secrets(after, *[r.key_id for r in await stack.registry.list_keys(bot.id)])


async def test_every_metric_the_dashboard_and_alerts_query_exists(bare_stack: Stack) -> None:
    stack = bare_stack
    worker = await stack.add_worker(worker_http_port=0)
    await stack.add_gateway()
    bot, key = await stack.bot_and_key(endpoint="fake", model="m")
    limited, _ = await stack.registry.create_key(bot.id, "limited", limits=Limits(rpm=1))
    assert (await stack.chat(key, ASK))[0] == 200
    events = await stream_chat(stack.http, stack.url, key, ASK)
    assert isinstance(events[-1], dict)
    assert events[-1]["status"] == "END"
    assert (await stack.chat("bl-nope", ASK))[0] == 401
    assert [(await stack.chat(limited, ASK))[0] for _ in range(2)] == [200, 429]
    stack.upstream.script(Script(status=500))
    assert (await stack.chat(key, ASK))[0] == 502
    async with serve_probes(worker.settings, worker, worker.metrics) as base:
        served = (await scrape(stack.http, stack.url)).names() | (
            await scrape(stack.http, base)
        ).names()
    queried = queried_metrics()
    assert len(queried) >= 10, queried  # the extractor found the panels and rules
    assert queried <= served, sorted(queried - served)


async def test_a_worker_lost_mid_stream_moves_redeliveries_and_the_error_code(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    stack = bare_stack
    stack.upstream.script(Script(tokens=["once ", "upon ", "a ", "time"], hold_after=2))
    await stack.add_gateway()
    _, key = await stack.bot_and_key(endpoint="fake", model="m")
    doomed = await processes("worker")
    before = await scrape(stack.http, stack.url)
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        events = sse_events(resp)
        assert isinstance(await anext(events), dict)
        doomed.signal(signal.SIGKILL)
        await doomed.wait()
        port = free_port()
        await processes("worker", BOTLINE_WORKER_HTTP_PORT=str(port))
        rest = [e async for e in events]
    last = rest[-1]
    assert isinstance(last, dict)
    assert (last["status"], last["error"]["code"]) == ("ERROR", "worker_lost")
    after = await scrape(stack.http, stack.url)
    lost = moved(before, after, "botline_requests_total", status="200", code="worker_lost")
    assert lost == 1
    assert after.value("botline_streams_open") == 0
    replacement = await scrape(stack.http, f"http://127.0.0.1:{port}")
    assert replacement.value("botline_worker_redeliveries_total") == 1
