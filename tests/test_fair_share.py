"""Fair share between keys and priorities on the jobs queue (issue 14, items 4 and 5).

Real Redis and RabbitMQ, fake model servers. One key floods a slow upstream
with 500 concurrent requests, all sent at once; another key's requests keep
their idle answer time and are never refused. With a backlog of low jobs, a
high job's wait stays near zero.

Measured here (2 cores, one worker of 100 slots of which 5 are the reserve,
a 3 s upstream for the flood): see docs/architecture.md, "Fair share and
priorities". Without the reserve, the flood's jobs all started together free
their slots together, and the other key's p50 was 2.2-2.5 times its idle one.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest

from services.worker.settings import EndpointConfig
from shared import keys
from tests.support import stack as stack_support
from tests.support.client import auth, chat
from tests.support.fake_openai import FakeOpenAI
from tests.support.stack import Stack, run_cli

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hi"}]}
# The fleet: one worker with this many job slots; a small jobs queue.
SLOTS = 100
QUEUE = 1000
# How long the flooded provider takes per answer.
SLOW_S = 3.0
# The fleet's slots kept for keys within their share (FAIR_RESERVE_SHARE 0.05).
RESERVE = 5


@pytest.fixture
async def slow() -> AsyncIterator[FakeOpenAI]:
    """The flooded provider: about ``SLOW_S`` per answer."""
    async with FakeOpenAI(delay_s=SLOW_S / 4, tokens=["a", "b", "c", "d"]) as server:
        yield server


@pytest.fixture
async def brisk() -> AsyncIterator[FakeOpenAI]:
    """The other bot's provider: about 0.2 s per answer."""
    async with FakeOpenAI(delay_s=0.1, tokens=["a", "b"]) as server:
        yield server


def _endpoints(stack: Stack, **fakes: FakeOpenAI) -> dict[str, EndpointConfig]:
    """The test endpoints, and one endpoint per fake provider, named as given."""
    return stack_support.test_endpoints(stack.upstream_url) | {
        name: EndpointConfig(kind="openai", base_url=fake.base_url, timeout_s=30)
        for name, fake in fakes.items()
    }


async def _fleet(stack: Stack, slow: FakeOpenAI, brisk: FakeOpenAI) -> None:
    endpoints = _endpoints(stack, slow=slow, brisk=brisk)
    await stack.add_worker(concurrency=SLOTS, endpoints=endpoints, jobs_max_length=QUEUE)
    await stack.add_gateway(jobs_max_length=QUEUE, fair_refresh_s=0.2)
    # The gateway knows the fleet's slots once it has read the heartbeats.
    await stack.gateway().fair_share.refresh()
    assert stack.gateway().fair_share.capacity == SLOTS
    assert stack.gateway().fair_share.reserve == RESERVE


async def _timed(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, float]:
    started = time.perf_counter()
    status, _, _ = await chat(http, url, key, ASK)
    return status, time.perf_counter() - started


async def _one_a_second(stack: Stack, key: str, n: int) -> list[tuple[int, float]]:
    """``n`` requests, one a second (each in its own task: a slow one doesn't delay the next)."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(_timed(stack.http, stack.url, key)))
        await asyncio.sleep(1.0)  # the caller's pace, not a wait for an effect
    return await asyncio.gather(*tasks)


async def test_a_flooding_key_does_not_slow_another_key(
    bare_stack: Stack, slow: FakeOpenAI, brisk: FakeOpenAI
) -> None:
    stack = bare_stack
    await _fleet(stack, slow, brisk)
    _, hog_key = await stack.bot_and_key(endpoint="slow")
    _, calm_key = await stack.bot_and_key(endpoint="brisk")
    hog_hash = keys.hash_key(hog_key)

    idle = await _one_a_second(stack, calm_key, 5)
    assert all(status == 200 for status, _ in idle)
    idle_p50 = statistics.median(t for _, t in idle)

    answered: list[int] = []
    refused: list[int] = []

    async def hog(http: aiohttp.ClientSession) -> None:
        status, _, _ = await chat(http, stack.url, hog_key, ASK)
        (answered if status == 200 else refused).append(status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        # All 500 at once: the flood's first jobs start together, and end together.
        hogs = [asyncio.create_task(hog(http)) for _ in range(500)]
        try:
            # The flood is on: every slot of the fleet but the reserve busy,
            # and all 500 requests arrived (in flight at the gateway, or refused).
            gateway = stack.gateway()
            async with asyncio.timeout(30):
                while (  # noqa: ASYNC110 -- counters, polled with a deadline
                    slow.in_flight < SLOTS - RESERVE
                    or gateway.inflight.count(hog_hash) + len(refused) + len(answered) < 500
                ):
                    await asyncio.sleep(0.05)
            loaded = await _one_a_second(stack, calm_key, 10)
            # Callers of the flood still waiting when the measure ends.
            waiting_at_end = sum(not task.done() for task in hogs)
            fair = stack.gateway().metrics.fair_share
            lowered = fair.labels("lowered")._value.get()
            held = fair.labels("held")._value.get()
            # Read before the flood's callers leave: a job let go as another is
            # cancelled may start before the cancelled one has stopped.
            max_in_flight = slow.max_in_flight
        finally:
            # The flood's callers leave: their jobs are cancelled.
            for task in hogs:
                task.cancel()
            await asyncio.gather(*hogs, return_exceptions=True)

    statuses = [status for status, _ in loaded]
    loaded_p50 = statistics.median(t for _, t in loaded)
    print(
        f"idle p50 {idle_p50:.3f}s loaded p50 {loaded_p50:.3f}s "
        f"hog answered {len(answered)} refused {sorted(set(refused))} lowered {lowered} "
        f"held {held} max {max_in_flight} loaded {[round(t, 2) for _, t in loaded]}"
    )
    assert statuses == [200] * 10, statuses
    assert loaded_p50 <= 2 * idle_p50, (idle_p50, loaded_p50)
    # The flood really was one: the slow provider was held at the fleet's
    # slots less the reserve, which the other key's jobs took.
    assert max_in_flight == SLOTS - RESERVE
    assert waiting_at_end > SLOTS, waiting_at_end
    assert set(refused) <= {503}
    # What kept it fair: the flood's jobs past its share went a step lower,
    # and waited in the gateway rather than take the reserve.
    assert lowered > 0
    assert held > 0


async def test_a_high_job_goes_before_a_backlog_of_low_ones(
    bare_stack: Stack, slow: FakeOpenAI, brisk: FakeOpenAI
) -> None:
    stack = bare_stack
    endpoints = _endpoints(stack, brisk=brisk)
    await stack.add_worker(concurrency=2, endpoints=endpoints)
    await stack.add_gateway(fair_refresh_s=0.2)
    # A low bot (its keys' class) and a key of a normal bot that is high itself.
    low_bot = await stack.registry.create_bot(
        name="low", model="m", endpoint="brisk", priority="low"
    )
    normal_bot = await stack.registry.create_bot(name="normal", model="m", endpoint="brisk")
    high_key, record = await stack.registry.create_key(normal_bot.id, "vip", priority="high")
    assert record.priority == "high"
    # One request each from 30 low keys: each within its share, so only the
    # class orders them. Two slots at ~0.2 s a job: a backlog of ~3 s.
    low_keys = [(await stack.registry.create_key(low_bot.id, f"l{i}"))[0] for i in range(30)]
    lows = [asyncio.create_task(_timed(stack.http, stack.url, key)) for key in low_keys]
    async with asyncio.timeout(10):
        while brisk.in_flight < 2:  # noqa: ASYNC110 -- a counter, polled with a deadline
            await asyncio.sleep(0.02)
    status, high_s = await _timed(stack.http, stack.url, high_key)
    low_results = await asyncio.gather(*lows)
    low_times = sorted(t for _, t in low_results)
    print(f"high {high_s:.3f}s lows {low_times[0]:.2f}..{low_times[-1]:.2f}s")
    assert status == 200
    assert all(s == 200 for s, _ in low_results)
    # The high job waited for one slot at most: about one job, not the backlog.
    assert high_s < 0.2 + 0.5, high_s
    assert low_times[-1] > 2.0  # the backlog was one
    gateway = stack.gateway()
    waited = gateway.metrics.queue_wait_by_priority.labels("high")._sum.get()
    assert waited < 0.5, waited


async def test_priority_is_set_by_the_admin_api_and_the_cli(bare_stack: Stack) -> None:
    stack = bare_stack
    token = "fair-share-admin-token"
    await stack.add_gateway(admin_tokens=[token])
    admin = f"{stack.url}/admin/api"
    async with stack.http.post(
        f"{admin}/bots", json={"name": "b", "priority": "low"}, headers=auth(token)
    ) as resp:
        assert resp.status == 201
        bot = await resp.json()
    assert bot["priority"] == "low"
    async with stack.http.post(
        f"{admin}/bots", json={"name": "b", "priority": "urgent"}, headers=auth(token)
    ) as resp:
        assert resp.status == 400
    async with stack.http.post(
        f"{admin}/bots/{bot['id']}/keys", json={"priority": "high"}, headers=auth(token)
    ) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert created["record"]["priority"] == "high"
    key_id = created["record"]["key_id"]
    async with stack.http.patch(
        f"{admin}/keys/{key_id}", json={"priority": None}, headers=auth(token)
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["priority"] is None  # the bot's, from now on
    async with stack.http.patch(
        f"{admin}/bots/{bot['id']}", json={"priority": "high"}, headers=auth(token)
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["priority"] == "high"
    async with stack.http.get(f"{admin}/openapi.json", headers=auth(token)) as resp:
        spec = await resp.text()
    assert '"priority"' in spec

    out, _ = await run_cli(stack.namespace, "bots", "create", "--name", "c", "--priority", "low")
    bot_id = orjson.loads(out)["id"]
    assert (await stack.registry.get_bot(bot_id)).priority == "low"  # type: ignore[union-attr]
    await run_cli(stack.namespace, "keys", "create", "--bot", bot_id, "--priority", "high")
    (record,) = await stack.registry.list_keys(bot_id)
    assert record.priority == "high"


async def test_a_low_job_ages_past_a_stream_of_high_ones(
    bare_stack: Stack, brisk: FakeOpenAI
) -> None:
    stack = bare_stack
    endpoints = _endpoints(stack, brisk=brisk)
    worker = await stack.add_worker(concurrency=1, endpoints=endpoints)
    await stack.add_gateway(fair_refresh_s=0.2, priority_aging_s=0.5)
    _, high_key = await stack.bot_and_key(endpoint="brisk", priority="high")
    _, low_key = await stack.bot_and_key(endpoint="brisk", priority="low")
    stop = asyncio.Event()
    highs: list[int] = []

    async def high_caller() -> None:
        # One slot, eight callers: high jobs always wait in the queue.
        while not stop.is_set():
            highs.append((await chat(stack.http, stack.url, high_key, ASK))[0])

    callers = [asyncio.create_task(high_caller()) for _ in range(8)]
    try:
        async with asyncio.timeout(10):
            while len(highs) < 8:  # noqa: ASYNC110 -- a counter, polled with a deadline
                await asyncio.sleep(0.02)
        low_ask = {"messages": [{"role": "user", "content": "the low one"}]}
        started = time.perf_counter()
        status, _, _ = await chat(stack.http, stack.url, low_key, low_ask)
        low_s = time.perf_counter() - started
        still_going = not stop.is_set() and all(not c.done() for c in callers)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    print(f"low answered in {low_s:.2f}s; highs answered {len(highs)}")
    assert status == 200
    assert still_going  # it went while the highs kept coming, not after them
    # Normal after 0.5 s, high after 1 s, then behind at most 8 highs of ~0.2 s.
    assert low_s < 4.0, low_s
    assert stack.gateway().metrics.jobs_aged._value.get() == 2
    # Three copies were queued; the model was asked once.
    asked = [r for r in brisk.requests if "the low one" in str(r.body["messages"])]
    assert len(asked) == 1
    # The copies left behind are dropped by the worker, not run.
    await worker.stats.wait_for("dropped", 2)


async def test_a_quorum_job_queue_takes_prioritised_jobs(bare_stack: Stack) -> None:
    """RabbitMQ 3.10's quorum queues have no priorities: no x-max-priority is
    declared for them, and jobs with a priority still run (first come, first served)."""
    stack = bare_stack
    await stack.add_worker(jobs_queue_type="quorum")
    await stack.add_gateway(jobs_queue_type="quorum")
    _, high_key = await stack.bot_and_key(priority="high")
    _, low_key = await stack.bot_and_key(priority="low")
    assert (await stack.chat(high_key, ASK))[0] == 200
    assert (await stack.chat(low_key, ASK))[0] == 200


async def test_on_a_small_queue_only_the_flooding_key_is_refused(
    bare_stack: Stack, slow: FakeOpenAI, brisk: FakeOpenAI
) -> None:
    stack = bare_stack
    endpoints = _endpoints(stack, slow=slow, brisk=brisk)
    # Four slots and room for 40 jobs: the flood alone would fill the queue.
    await stack.add_worker(concurrency=4, endpoints=endpoints, jobs_max_length=40)
    await stack.add_gateway(jobs_max_length=40, fair_refresh_s=0.2)
    await stack.gateway().fair_share.refresh()
    _, hog_key = await stack.bot_and_key(endpoint="slow")
    _, calm_key = await stack.bot_and_key(endpoint="brisk")
    hogs = [asyncio.create_task(chat(stack.http, stack.url, hog_key, ASK)) for _ in range(60)]
    try:
        # The flood's extra requests are refused at once: the first 24 (its
        # share of 4 slots, then 20 of the queue's 40 places) stay.
        refused = []
        for done in asyncio.as_completed(hogs):
            status, body, headers = await done
            refused.append((status, body["error"]["code"], int(headers["Retry-After"])))
            if len(refused) == 36:
                break
        assert {(s, c) for s, c, _ in refused} == {(503, "overloaded")}
        assert all(r >= 1 for _, _, r in refused)
        calm = [await chat(stack.http, stack.url, calm_key, ASK) for _ in range(3)]
        assert [status for status, _, _ in calm] == [200, 200, 200]
        # Four slots keep no reserve (FAIR_RESERVE_SHARE 0.05): nothing waits in the gateway.
        assert stack.gateway().fair_share.reserve == 0
        assert stack.gateway().metrics.fair_share.labels("held")._value.get() == 0
    finally:
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)


async def test_a_job_over_the_share_waits_in_the_gateway_for_a_job_to_end(
    bare_stack: Stack, slow: FakeOpenAI, brisk: FakeOpenAI
) -> None:
    stack = bare_stack
    endpoints = _endpoints(stack, slow=slow, brisk=brisk)
    # Four slots, one of them the reserve: a key alone has a share of three.
    await stack.add_worker(concurrency=4, endpoints=endpoints)
    await stack.add_gateway(fair_refresh_s=0.2, fair_reserve_share=0.25)
    gateway = stack.gateway()
    await gateway.fair_share.refresh()
    assert (gateway.fair_share.capacity, gateway.fair_share.reserve) == (4, 1)
    _, hog_key = await stack.bot_and_key(endpoint="slow")
    _, calm_key = await stack.bot_and_key(endpoint="brisk")
    hog_hash = keys.hash_key(hog_key)
    slots = gateway.fair_share.slots

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():  # noqa: ASYNC110 -- counters, polled with a deadline
                await asyncio.sleep(0.02)

    hogs = [asyncio.create_task(chat(stack.http, stack.url, hog_key, ASK)) for _ in range(4)]
    leaving = {"messages": [{"role": "user", "content": "the one that left"}]}
    leaver = asyncio.create_task(chat(stack.http, stack.url, hog_key, leaving))
    try:
        # Three jobs run; the fourth and fifth wait in the gateway, not the queue.
        await until(lambda: slots.held == 2 and slow.in_flight == 3)
        # The fifth's caller hangs up while held: it is let go, nothing published.
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        await until(lambda: slots.held == 1 and gateway.inflight.count(hog_hash) == 4)
        # The reserve answers the other key at once.
        status, _, _ = await chat(stack.http, stack.url, calm_key, ASK)
        assert status == 200
        assert slow.in_flight == 3
        # The held job is published as soon as one of the three ends.
        results = await asyncio.gather(*hogs)
    finally:
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
    assert [status for status, _, _ in results] == [200] * 4
    assert slow.max_in_flight == 3
    assert len(slow.requests) == 4
    assert not any("the one that left" in str(r.body["messages"]) for r in slow.requests)
    assert (slots.taken, slots.held) == (0, 0)
    fair = gateway.metrics.fair_share
    assert fair.labels("held")._value.get() == 2
    assert fair.labels("lowered")._value.get() == 2
