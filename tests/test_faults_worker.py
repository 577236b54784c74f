"""Worker and gateway faults (issue 11): no job run twice for nobody, no innocent buried,
a dead gateway's whole answers stopped.

Workers here are real ``botline`` processes that the tests SIGKILL and SIGSTOP (ours to
break); the broker and Redis are the shared ones, each test in a namespace of its own.
Measured times are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from tests.support.client import auth, chat, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import Process, ProcessFactory, Stack, free_port
from tests.support.stack import test_endpoints as endpoints_for_tests
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "tell me a story"}]}


def log_events(process: Process, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process whose ``event`` is ``name``."""
    found = []
    for line in Path(process.log_path).read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
    return found


async def test_a_frozen_worker_does_not_run_a_job_again_for_a_caller_who_had_its_error(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    """One worker, heartbeat 2 s, frozen 14 s: the broker drops it and redelivers its job,
    the gateway has long answered the caller (event timeout 9 s, after the drop, so its
    cancel reaches no worker); after SIGCONT the model is not called a second time."""
    freeze_s, event_timeout_s = 14.0, 9.0
    up = bare_stack.upstream
    # 100 deltas over 20 s: the first call is still running when the worker is thawed.
    up.script(Script(tokens=[f"t{i} " for i in range(100)], delay_s=0.2))
    await bare_stack.add_gateway(event_timeout_s=event_timeout_s)
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
    worker = await processes("worker", BOTLINE_AMQP_HEARTBEAT_S="2")

    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        events = sse_events(resp)
        first = await anext(events)
        assert isinstance(first, dict)
        assert first["status"] == "START"
        worker.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        rest = [e async for e in events]
        answered_after = time.monotonic() - frozen_at
    statuses = [e["status"] for e in rest if isinstance(e, dict)]
    assert statuses.count("ERROR") == 1
    assert statuses[-1] == "ERROR"
    last = rest[-1]
    assert isinstance(last, dict)
    assert last["error"]["code"] == "deadline_exceeded"
    assert answered_after < event_timeout_s + 2

    # Holding the freeze is the scenario itself, not a wait for an effect.
    await asyncio.sleep(freeze_s - (time.monotonic() - frozen_at))
    worker.signal(signal.SIGCONT)
    thawed_at = time.monotonic()
    # The running call is stopped (it fails on its dead channel, or is cancelled when the
    # worker sees its connection gone): its acks and events can no longer land.
    async with asyncio.timeout(10):
        await up.requests[0].disconnected.wait()
    stopped_after = time.monotonic() - thawed_at
    # The redelivered job reaches the reconnected worker, which drops it unrun (or, without
    # the closed marker, calls the model again).
    dropped = asyncio.create_task(worker.wait_for("job.dropped", timeout=30))
    rerun = asyncio.create_task(up.wait_request(2, timeout=30))
    done, pending = await asyncio.wait({dropped, rerun}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert rerun not in done, "the model was called again for a caller who had its error"
    await dropped
    dropped_after = time.monotonic() - thawed_at
    assert [e["reason"] for e in log_events(worker, "job.dropped")] == ["closed"]
    assert not up.requests[0].finished.is_set()
    assert len(up.requests) == 1, "the model was called again for a caller who had its error"
    print(
        f"\nmeasured: frozen worker: caller's error after {answered_after:.2f} s; after thaw "
        f"the running call stopped in {stopped_after:.2f} s, the redelivery dropped after "
        f"{dropped_after:.2f} s; upstream calls: {len(up.requests)}"
    )


def identified_worker_env(name: str, upstream_url: str, limit: int) -> dict[str, str]:
    """A worker whose calls to the fake model carry ``Bearer <name>``, so the test can tell
    which process made a call without any test hook in the worker."""
    endpoints = endpoints_for_tests(upstream_url)
    endpoints["fake"] = endpoints["fake"].model_copy(update={"api_key_env": "FAKE_UPSTREAM_KEY"})
    return {
        "FAKE_UPSTREAM_KEY": name,
        "BOTLINE_JOBS_DELIVERY_LIMIT": str(limit),
        "BOTLINE_ENDPOINTS": orjson.dumps(
            {k: v.model_dump() for k, v in endpoints.items()}
        ).decode(),
    }


async def test_a_poison_job_is_buried_alone(bare_stack: Stack, processes: ProcessFactory) -> None:
    """A job that kills whichever worker runs it, 50 innocent jobs in flight beside it, workers
    restarted as they die: exactly one ``job_failed``, 50 exact answers."""
    limit, innocents = 2, 50
    up = bare_stack.upstream
    for _ in range(limit + 3):
        up.script(Script(hold_after=0))  # the poison's call hangs until its worker dies
    await bare_stack.add_gateway(jobs_delivery_limit=limit)
    _, innocent_key = await bare_stack.bot_and_key(endpoint="echo-slow")
    _, poison_key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")

    workers: dict[str, Process] = {}
    dead: list[Process] = []
    started = 0

    async def start_worker() -> None:
        nonlocal started
        name = f"w{started}"
        started += 1
        workers[name] = await processes("worker", **identified_worker_env(name, up.base_url, limit))

    async def kill_whoever_runs_the_poison() -> None:
        # Only the poison calls the fake model: its n-th call names the worker to kill.
        n = 0
        while True:
            n += 1
            call = await up.wait_request(n, timeout=60)
            name = call.headers["Authorization"].removeprefix("Bearer ")
            doomed = workers.pop(name)
            doomed.signal(signal.SIGKILL)
            # Counted once killed: the job may be buried, and this task cancelled, before
            # the kill's exit is reaped.
            dead.append(doomed)
            await doomed.wait()
            await start_worker()

    await asyncio.gather(*(start_worker() for _ in range(3)))
    killer = asyncio.create_task(kill_whoever_runs_the_poison())
    texts = [f"innocent {i} is not to blame at all" for i in range(innocents)]
    try:
        answers = await asyncio.gather(
            *(
                chat(bare_stack.http, bare_stack.url, innocent_key, {
                    "messages": [{"role": "user", "content": text}]
                })
                for text in texts
            ),
            chat(bare_stack.http, bare_stack.url, poison_key, ASK),
        )  # fmt: skip
    finally:
        killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)

    *innocent_answers, poison = answers
    assert (poison[0], poison[1]["error"]["code"]) == (502, "job_failed")
    for (status, body, _), text in zip(innocent_answers, texts, strict=True):
        assert status == 200, body
        assert body["choices"]["message"]["content"] == text
    assert len(up.requests) == limit + 1  # one run as a job, then one per strike
    assert len(dead) == limit + 1
    # Innocents did die with the poison (and were run again as suspects).
    everyone = [*dead, *workers.values()]
    retried = sum(len(log_events(p, "job.retried")) for p in everyone)
    assert retried > limit, "no innocent job shared a worker with the poison"
    buried = sum(len(log_events(p, "job.dead")) for p in everyone)
    assert buried == 1
    print(f"\nmeasured: poison: {retried - limit} innocent redeliveries, 1 job buried")


async def test_a_dead_gateways_whole_answer_stops_upstream(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    """kill -9 a gateway mid whole answer: the worker's beat finds no reply queue, bounces
    back, and the upstream call is cancelled within a second; ``job.orphaned`` names the job."""
    up = bare_stack.upstream
    up.script(Script(hold_after=0))  # a whole answer that would take forever
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        worker = await bare_stack.add_worker()
        port = free_port()
        gateway = await processes("gateway", "--port", str(port))
        _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
        caller = asyncio.create_task(chat(bare_stack.http, f"http://127.0.0.1:{port}", key, ASK))
        call = await up.wait_request(1)
        gateway.signal(signal.SIGKILL)
        await gateway.wait()
        killed_at = time.monotonic()
        async with asyncio.timeout(1.0):
            await call.disconnected.wait()
        stopped_after = time.monotonic() - killed_at
        with pytest.raises(aiohttp.ClientError):
            await caller
        await worker.stats.wait_for("cancelled", 1)
    orphaned = [e for e in logs if e["event"] == "job.orphaned"]
    cancelled = [e for e in logs if e["event"] == "job.cancelled"]
    assert len(orphaned) == 1
    assert orphaned[0]["job_id"].startswith("chatcmpl-")
    assert [e["job_id"] for e in cancelled] == [orphaned[0]["job_id"]]
    print(
        f"\nmeasured: dead gateway: whole answer's upstream call stopped in {stopped_after:.3f} s"
    )


async def test_a_killed_worker_costs_the_caller_a_fraction_of_a_second(
    bare_stack: Stack, processes: ProcessFactory
) -> None:
    """SIGKILL the worker mid answer, another worker up: a stream that had text ends with one
    ``worker_lost`` at once; a whole answer is run again unseen and arrives exact."""
    up = bare_stack.upstream
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
    workers = {
        name: await processes("worker", **identified_worker_env(name, up.base_url, 3))
        for name in ("a", "b", "c")
    }

    async def kill_caller_of(call_number: int) -> float:
        call = await up.wait_request(call_number)
        doomed = workers.pop(call.headers["Authorization"].removeprefix("Bearer "))
        doomed.signal(signal.SIGKILL)
        await doomed.wait()
        return time.monotonic()

    up.script(Script(tokens=["once ", "upon ", "a ", "time"], hold_after=1))
    async with bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        events = sse_events(resp)
        assert (await anext(events))["status"] == "START"  # type: ignore[index]
        killed_at = await kill_caller_of(1)
        rest = [e async for e in events]
        stream_after = time.monotonic() - killed_at
    assert [e["status"] for e in rest if isinstance(e, dict)] == ["ERROR"]
    assert rest[0]["error"]["code"] == "worker_lost"  # type: ignore[index]

    up.script(Script(hold_after=0))  # the whole answer's first run never ends
    (status, body, _), killed_at = await asyncio.gather(
        chat(bare_stack.http, bare_stack.url, key, ASK), kill_caller_of(3)
    )
    whole_after = time.monotonic() - killed_at
    assert status == 200, body
    assert body["choices"]["message"]["content"] == "fake reply to: tell me a story"
    assert stream_after < 2
    assert whole_after < 2
    print(
        f"\nmeasured: worker killed: stream's worker_lost {stream_after:.3f} s after the kill, "
        f"whole answer exact {whole_after:.3f} s after the kill"
    )


async def test_a_caller_who_hangs_up_stops_the_model_at_once(bare_stack: Stack) -> None:
    """Stream or whole answer: the upstream call is closed within a second of the hang-up."""
    up = bare_stack.upstream
    await bare_stack.add_worker()
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")

    up.script(Script(tokens=["a ", "b ", "c"], hold_after=1))
    resp = await bare_stack.http.post(
        f"{bare_stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    )
    assert (await anext(sse_events(resp)))["status"] == "START"  # type: ignore[index]
    resp.close()
    gone_at = time.monotonic()
    async with asyncio.timeout(1):
        await up.requests[0].disconnected.wait()
    stream_after = time.monotonic() - gone_at

    up.script(Script(hold_after=0))
    caller = asyncio.create_task(chat(bare_stack.http, bare_stack.url, key, ASK))
    call = await up.wait_request(2)
    caller.cancel()  # closes the caller's connection
    gone_at = time.monotonic()
    async with asyncio.timeout(1):
        await call.disconnected.wait()
    whole_after = time.monotonic() - gone_at
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    await bare_stack.workers[0].stats.wait_for("cancelled", 2)
    print(
        f"\nmeasured: caller gone: upstream closed {stream_after:.3f} s (stream) and "
        f"{whole_after:.3f} s (whole) after the hang-up"
    )


async def test_a_worker_that_loses_its_connection_stops_its_jobs(bare_stack: Stack) -> None:
    """The worker's AMQP connection is cut (a proxy resets it): its running upstream call is
    cancelled at once (its ack could no longer land), and once it is back the redelivered
    job answers the caller, who still waits."""
    up = bare_stack.upstream
    up.script(Script(hold_after=0))  # the first call would never end
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        worker = await bare_stack.add_worker(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        await bare_stack.add_gateway()
        _, key = await bare_stack.bot_and_key(endpoint="fake", model="fake-model")
        caller = asyncio.create_task(chat(bare_stack.http, bare_stack.url, key, ASK))
        call = await up.wait_request(1)
        await proxy.down()
        cut_at = time.monotonic()
        async with asyncio.timeout(2):
            await call.disconnected.wait()
        stopped_after = time.monotonic() - cut_at
        await worker.stats.wait_for("abandoned", 1)
        await proxy.up()
        status, body, _ = await caller
        # Stopped while its broker is still reachable (through the proxy).
        bare_stack.workers.remove(worker)
        await worker.stop()
    assert status == 200, body
    assert body["choices"]["message"]["content"] == "fake reply to: tell me a story"
    assert len(up.requests) == 2
    print(
        f"\nmeasured: connection lost: the worker's upstream call stopped in {stopped_after:.3f} s"
    )
