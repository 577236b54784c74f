"""Defaults that stream, and ``--processes N`` for the gateway and the worker (issue 13)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from services.worker.settings import (
    DEFAULT_ENDPOINT_CONCURRENCY,
    JOB_MEMORY_BYTES,
    MAX_AUTO_PREFETCH,
    EndpointConfig,
    auto_prefetch,
)
from tests.support.client import OPENAI_CHAT, auth, sse_events
from tests.support.stack import Process, ProcessFactory, Stack, free_port

pytestmark = pytest.mark.integration

GIB = 1024**3


def test_auto_prefetch_is_the_endpoints_caps_bounded_by_memory() -> None:
    echo = EndpointConfig(kind="echo")
    small = EndpointConfig(kind="openai", base_url="http://x/v1", max_concurrency=4)
    assert echo.max_concurrency == DEFAULT_ENDPOINT_CONCURRENCY >= 1000
    # Plenty of memory: the endpoints' caps, added up.
    assert auto_prefetch({"echo": echo, "small": small}, 1, 64 * GIB) == 1004
    assert auto_prefetch({"small": small}, 1, 64 * GIB) == 4
    # Memory shared by processes: half of it, a job's worth each.
    half_gib = GIB // 2
    assert auto_prefetch({"echo": echo}, 1, half_gib) == 1000
    assert auto_prefetch({"echo": echo}, 2, half_gib) == half_gib // 2 // JOB_MEMORY_BYTES // 2
    assert auto_prefetch({"echo": echo}, 64, 16 * 1024**2) == 1  # never 0
    # Never a hoard, whatever the caps.
    many = {f"e{i}": echo for i in range(10)}
    assert auto_prefetch(many, 1, 64 * GIB) == MAX_AUTO_PREFETCH


async def test_a_default_worker_runs_streams_side_by_side(bare_stack: Stack) -> None:
    """With the old prefetch (64), stream 65 got its first token only once a stream ended."""
    worker = await bare_stack.add_worker()
    await bare_stack.add_gateway()
    assert worker.settings.concurrency >= 1000
    _, key = await bare_stack.bot_and_key(endpoint="echo-slow")  # 50 ms a word
    words = " ".join(f"w{i}" for i in range(100))  # each stream lasts 5 s at least
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": words}]}
    streams = 150
    firsts: list[float] = []
    ends: list[float] = []

    async def one(http: aiohttp.ClientSession) -> None:
        first = None
        async with http.post(bare_stack.url + OPENAI_CHAT, json=body, headers=auth(key)) as resp:
            assert resp.status == 200
            async for event in sse_events(resp):
                if first is None and isinstance(event, dict) and _has_content(event):
                    first = time.monotonic()
        ends.append(time.monotonic())
        assert first is not None
        firsts.append(first)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(http) for _ in range(streams)))
    assert len(firsts) == len(ends) == streams
    # Every stream had its first words before any stream was over: none queued behind another.
    assert max(firsts) < min(ends)


def _has_content(event: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in event.get("choices") or ())


def _lines(process: Process) -> list[dict[str, Any]]:
    found = []
    for raw in process.log_path.read_bytes().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(line, dict):
            found.append(line)
    return found


async def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Poll ``check`` until true: the children's log lines can only be read, not awaited."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def _ids(process: Process, event: str, field: str) -> dict[str, int]:
    """``field`` -> pid, from the lines of ``event`` in the log."""
    return {line[field]: line["pid"] for line in _lines(process) if line.get("event") == event}


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_two_gateway_processes_share_a_port_and_stop_together(
    processes: ProcessFactory, bare_stack: Stack
) -> None:
    await processes("worker")
    port = free_port()
    gateway = await processes("gateway", "--processes", "2", "--port", str(port))
    await _until(
        "both gateways listen",
        lambda: len(_ids(gateway, "gateway.listening", "gateway_id")) == 2,
    )
    listening = _ids(gateway, "gateway.listening", "gateway_id")
    assert len(set(listening.values())) == 2  # two processes, each with its own id
    # Each froze its own start-up heap before it listened (shared.loop.settle_heap).
    settled = [line for line in _lines(gateway) if line.get("event") == "gc.settled"]
    assert {line["pid"] for line in settled} == set(listening.values())
    assert all(line["frozen_objects"] > 10_000 for line in settled)
    assert gateway.proc is not None
    assert gateway.proc.pid not in listening.values()
    _, key = await bare_stack.bot_and_key()
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}

    def answered_by() -> set[str]:
        return {
            line["gateway_id"]
            for line in _lines(gateway)
            if line.get("event") == "http.request" and line.get("status") == 200
        }

    # A new connection each time: the kernel spreads connections, not requests.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(40):
            url = f"http://127.0.0.1:{port}{OPENAI_CHAT}"
            async with http.post(url, json=body, headers=auth(key)) as resp:
                assert resp.status == 200
                answer = await resp.json()
            assert answer["choices"][0]["message"]["content"] == "hello there"
    await _until("both gateways answered", lambda: answered_by() == set(listening))

    gateway.signal(signal.SIGTERM)
    assert await gateway.wait() == 0
    assert all(_gone(pid) for pid in listening.values())
    # Each stopped gracefully, on the forwarded signal.
    assert set(_ids(gateway, "gateway.stopping", "gateway_id")) == set(listening)


async def test_worker_processes_share_the_jobs_and_stop_together(
    processes: ProcessFactory, bare_stack: Stack
) -> None:
    worker = await processes("worker", "--processes", "2")
    await _until(
        "both workers started", lambda: len(_ids(worker, "worker.started", "worker_id")) == 2
    )
    started = _ids(worker, "worker.started", "worker_id")
    await _until(
        "both workers settled their heaps",
        lambda: len(_ids(worker, "gc.settled", "worker_id")) == 2,
    )
    assert _ids(worker, "gc.settled", "worker_id") == started
    prefetch = {
        line["concurrency"] for line in _lines(worker) if line.get("event") == "worker.prefetch"
    }
    assert len(prefetch) == 1  # resolved once by the parent: the same share for each
    await bare_stack.add_gateway()
    _, key = await bare_stack.bot_and_key(endpoint="echo-slow")
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}
    results = await asyncio.gather(*(bare_stack.chat(key, body) for _ in range(40)))
    assert [status for status, _, _ in results] == [200] * 40

    def finished_by() -> set[str]:
        return {line["worker_id"] for line in _lines(worker) if line.get("event") == "job.finished"}

    # 40 jobs of 150 ms each, handed out round robin: both took some.
    await _until("both workers ran jobs", lambda: finished_by() == set(started))
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
    assert all(_gone(pid) for pid in started.values())
    assert set(_ids(worker, "worker.stopped", "worker_id")) == set(started)
    # Two processes wrote to one pipe at once, and no line ran into another.
    raw = worker.log_path.read_bytes().splitlines()
    assert all(isinstance(orjson.loads(line), dict) for line in raw if line.strip())


async def test_a_child_that_dies_stops_the_others_and_the_parent_fails(
    processes: ProcessFactory,
) -> None:
    port = free_port()
    gateway = await processes("gateway", "--processes", "2", "--port", str(port))
    await _until(
        "both gateways listen",
        lambda: len(_ids(gateway, "gateway.listening", "gateway_id")) == 2,
    )
    listening = _ids(gateway, "gateway.listening", "gateway_id")
    doomed, survivor = sorted(listening)
    os.kill(listening[doomed], signal.SIGKILL)
    # Not restarted: the parent stops the survivor and exits, for an orchestrator to see.
    assert await gateway.wait() == 128 + signal.SIGKILL  # the status a shell gives the child
    assert _gone(listening[survivor])
    assert set(_ids(gateway, "gateway.stopping", "gateway_id")) == {survivor}
    assert len(_ids(gateway, "gateway.listening", "gateway_id")) == 2  # nothing restarted
