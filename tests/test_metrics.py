"""Prometheus metrics: the right series move with real requests, and no key is ever a label."""

from __future__ import annotations

import asyncio

import pytest

from shared.records import Limits
from tests.support.client import OPENAI_CHAT, auth, sse_events
from tests.support.metrics import Scrape, scrape
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hello there metrics"}]}


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
    # Process figures come along (CPU per request for sizing).
    assert after.value("process_cpu_seconds_total") > 0
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
