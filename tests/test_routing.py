"""A bot's ordered endpoints: fallbacks before the first delta, fleet cooldowns, Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from services.worker.settings import EndpointConfig
from tests.support.client import OPENAI_CHAT, auth, sse_events
from tests.support.fake_openai import FakeOpenAI, Script
from tests.support.fleet import until_endpoint_state
from tests.support.stack import Stack, free_port

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hello there"}]}
REPLY = "fake reply to: hello there"
HEADER = "x-botline-endpoint"


@contextlib.contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Log entries as written, request-scoped fields included (``capture_logs`` drops those)."""
    capture = LogCapture()
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=processors)


@pytest.fixture
async def primary() -> AsyncIterator[FakeOpenAI]:
    """A second fake provider: the bots' first choice; the stack's upstream is the backup."""
    async with FakeOpenAI() as server:
        yield server


def endpoints(primary_url: str, backup_url: str, **primary: Any) -> dict[str, EndpointConfig]:
    """``primary`` (short timeouts: a stall is noticed fast) and ``backup``."""
    short = {"timeout_s": 1.0, "first_byte_timeout_s": 0.5}
    return {
        "primary": EndpointConfig(kind="openai", base_url=primary_url, **(short | primary)),
        "backup": EndpointConfig(kind="openai", base_url=backup_url, timeout_s=5),
    }


async def fallback_stack(stack: Stack, primary: FakeOpenAI, workers: int = 1, **cfg: Any) -> str:
    """Workers knowing primary and backup, a gateway, and a key of a bot naming both in order."""
    for _ in range(workers):
        await stack.add_worker(endpoints=endpoints(primary.base_url, stack.upstream_url, **cfg))
    await stack.add_gateway()
    _, key = await stack.bot_and_key(
        endpoints=[{"name": "primary"}, {"name": "backup"}], model="fake-model"
    )
    return key


async def stream(stack: Stack, key: str) -> tuple[list[dict[str, Any]], str | None]:
    """A seed-format stream: its events and the endpoint header."""
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status == 200, await resp.text()
        events = [e async for e in sse_events(resp)]
        return [e for e in events if isinstance(e, dict)], resp.headers.get(HEADER)


FAILURES = {
    "500": Script(status=500),
    "429": Script(status=429, retry_after=30),
    "stall": Script(stall_s=3),
}


@pytest.mark.parametrize("failure", ["refused", "500", "429", "stall"])
async def test_a_failure_before_the_first_delta_moves_to_the_next_endpoint(
    bare_stack: Stack, primary: FakeOpenAI, failure: str
) -> None:
    key = await fallback_stack(bare_stack, primary)
    if failure == "refused":
        await primary.close()  # nothing listens: the connection is refused
    else:
        primary.script(FAILURES[failure])
    started = time.monotonic()
    events, endpoint = await stream(bare_stack, key)
    took = time.monotonic() - started
    assert events[0]["status"] == "START"
    assert events[-1]["status"] == "END"
    assert "".join(e["choices"]["delta"]["content"] for e in events) == REPLY
    assert endpoint == "backup"
    # A short backoff, plus the stall's first-byte timeout (0.5 s) where it applies.
    assert took < (1.5 if failure == "stall" else 1.0), took
    if failure != "refused":
        assert len(primary.requests) == 1
    assert len(bare_stack.upstream.requests) == 1


async def test_the_answering_endpoint_is_in_the_header_on_both_surfaces(
    bare_stack: Stack, primary: FakeOpenAI
) -> None:
    key = await fallback_stack(bare_stack, primary)
    status, body, headers = await bare_stack.chat(key, ASK)
    assert (status, headers.get(HEADER)) == (200, "primary"), body
    primary.script(Script(status=503))
    with captured_logs() as logs:
        status, body, headers = await bare_stack.chat(key, ASK | {"model": "x"}, path=OPENAI_CHAT)
    assert (status, headers.get(HEADER)) == (200, "backup"), body
    assert body["choices"][0]["message"]["content"] == REPLY
    # And in the logs: the worker's failure and answer, the gateway's request line.
    seen = [(e["event"], e.get("endpoint")) for e in logs if "endpoint" in e]
    assert ("endpoint.failed", "primary") in seen
    assert ("endpoint.answered", "backup") in seen
    assert ("job.finished", "backup") in seen
    assert ("http.request", "backup") in seen
    # A single endpoint, as before, names itself.
    _, single = await bare_stack.bot_and_key(endpoint="primary", model="fake-model")
    status, _, headers = await bare_stack.chat(single, ASK)
    assert (status, headers.get(HEADER)) == (200, "primary")


async def test_a_failure_after_the_first_delta_is_one_error_event(
    bare_stack: Stack, primary: FakeOpenAI
) -> None:
    key = await fallback_stack(bare_stack, primary)
    primary.script(Script(tokens=["a ", "b ", "c"], hold_after=1))
    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.headers.get(HEADER) == "primary"
        events = sse_events(resp)
        assert (await anext(events))["status"] == "START"  # type: ignore[index]
        await primary.close()  # the provider dies mid-answer
        rest = [e async for e in events if isinstance(e, dict)]
    assert [e["status"] for e in rest] == ["ERROR"]
    assert rest[0]["error"]["code"] == "upstream_error"
    assert bare_stack.upstream.requests == []  # no second answer glued on


async def test_only_4xx_other_than_429_is_not_retried(
    bare_stack: Stack, primary: FakeOpenAI
) -> None:
    key = await fallback_stack(bare_stack, primary)
    primary.script(Script(status=400))
    status, body, _ = await bare_stack.chat(key, ASK)
    assert (status, body["error"]["code"]) == (502, "upstream_error")
    assert bare_stack.upstream.requests == []


async def test_retry_after_pauses_the_endpoint_for_the_fleet_then_it_is_used_again(
    bare_stack: Stack, primary: FakeOpenAI
) -> None:
    # Two workers taking one job at a time, a bot with one endpoint.
    for _ in range(2):
        await bare_stack.add_worker(
            endpoints=endpoints(primary.base_url, bare_stack.upstream_url), concurrency=1
        )
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="primary", model="fake-model")
    primary.script(Script(status=429, retry_after=1))
    first = asyncio.create_task(bare_stack.chat(key, ASK))
    await until_state(bare_stack, "primary", "paused")
    # The worker holding the first job waits out the pause; the other takes these.
    others = await asyncio.gather(*(bare_stack.chat(key, ASK) for _ in range(3)))
    answers = [await first, *others]
    assert [a[0] for a in answers] == [200] * 4, answers
    assert {a[2].get(HEADER) for a in answers} == {"primary"}
    arrivals = sorted(r.arrived for r in primary.requests)
    assert len(arrivals) == 5
    # The 429, then nothing from any worker for the second it asked for.
    assert all(t - arrivals[0] >= 0.95 for t in arrivals[1:]), [t - arrivals[0] for t in arrivals]
    assert all(w.router.stats[("primary", "answered")] > 0 for w in bare_stack.workers)


async def until_state(stack: Stack, endpoint: str, state: str) -> None:
    """Until the fleet's record says ``endpoint`` is in ``state``."""
    names = stack.workers[0].settings.names
    await until_endpoint_state(stack.registry.redis, names, endpoint, state)


async def test_cooldown_is_shared_by_the_fleet_then_one_probe_brings_it_back(
    bare_stack: Stack, primary: FakeOpenAI
) -> None:
    key = await fallback_stack(
        bare_stack,
        primary,
        workers=2,
        cooldown_failures=2,
        cooldown_window_s=10,
        cooldown_s=0.5,
        timeout_s=5,
    )
    for _ in range(2):
        primary.script(Script(status=500))
    for _ in range(2):  # two failures, each hidden from its caller by the backup
        status, _, headers = await bare_stack.chat(key, ASK)
        assert (status, headers.get(HEADER)) == (200, "backup")
    # Cooling down: no worker calls primary.
    answers = await asyncio.gather(*(bare_stack.chat(key, ASK) for _ in range(6)))
    assert {(a[0], a[2].get(HEADER)) for a in answers} == {(200, "backup")}
    assert len(primary.requests) == 2
    assert {w.router.stats[("backup", "answered")] > 0 for w in bare_stack.workers} == {True}
    # One record for the fleet: the endpoint was opened once, by one worker.
    assert sum(w.router.counts().cooldowns_opened for w in bare_stack.workers) == 1
    await until_state(bare_stack, "primary", "half_open")
    # Half-open: of three callers at once, one probes primary (held), the others go to backup.
    probe = Script(hold_after=0)
    primary.script(probe)
    calls = [asyncio.create_task(bare_stack.chat(key, ASK)) for _ in range(3)]
    pending = set(calls)
    async with asyncio.timeout(5):
        while len(pending) > 1:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    assert len(primary.requests) == 3  # the two failures, and the one probe
    probe.release.set()
    answers = [await c for c in calls]
    assert sorted(a[2].get(HEADER) or "" for a in answers) == ["backup", "backup", "primary"]
    # Traffic is back.
    status, _, headers = await bare_stack.chat(key, ASK)
    assert (status, headers.get(HEADER)) == (200, "primary")


async def test_calls_in_flight_are_capped_for_the_fleet(bare_stack: Stack) -> None:
    up = bare_stack.upstream
    capped = {
        "capped": EndpointConfig(kind="openai", base_url=up.base_url, timeout_s=5, max_in_flight=2)
    }
    for _ in range(2):
        await bare_stack.add_worker(endpoints=capped)
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="capped", model="fake-model")
    for _ in range(6):
        up.script(Script(tokens=["slow ", "answer"], delay_s=0.1))
    answers = await asyncio.gather(*(bare_stack.chat(key, ASK) for _ in range(6)))
    assert [a[0] for a in answers] == [200] * 6
    assert {a[1]["choices"]["message"]["content"] for a in answers} == {"slow answer"}
    assert up.max_in_flight == 2  # six callers, two workers, never more than declared


async def test_without_redis_workers_fail_open(bare_stack: Stack, primary: FakeOpenAI) -> None:
    # The worker's Redis is a port nothing listens on; the gateway's is the real one.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    await bare_stack.add_worker(
        endpoints=endpoints(primary.base_url, bare_stack.upstream_url, rpm=1),
        redis_url=dead,
        redis_timeout_s=0.2,
    )
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(
        endpoints=[{"name": "primary"}, {"name": "backup"}], model="fake-model"
    )
    primary.script(Script(status=500))
    answers = [await bare_stack.chat(key, ASK) for _ in range(3)]
    # Fallback still works; the budget (rpm=1) and cooldowns are simply not there.
    assert [(a[0], a[2].get(HEADER)) for a in answers] == [
        (200, "backup"),
        (200, "primary"),
        (200, "primary"),
    ]
    router = bare_stack.workers[0].router
    assert router.cooldowns.redis_errors > 0
    assert router.budget.redis_errors > 0
