"""``python -m bench.timeline``: where a lone whole answer's time goes, step by step.

At c=1 what botline adds over the direct call is the time of its path, and the
benchmark's figures (latency, CPU per answer) do not say which step of it
takes what. This runs botline as the benchmark starts it (``bench.targets.botline``:
defaults, a namespace of its own, the fake upstream answering 32 tokens at once),
each process under ``bench.marks`` (a few functions on the path marked on the
machine's monotonic clock), and asks ``--requests`` whole answers one at a time
from a plain blocking socket of its own, marking each call and each answer.
Every call's marks, in time order, make its steps; the report gives each step's
median over the calls, in path order, and the share of the caller's median
round trip.

Beside it, the same caller asks the fake upstream directly: back to back, and
after ``--idle-ms`` of its own busy waiting between calls. The difference is
what waking a process (and a core) that has been idle costs on this machine,
which every hop of a c=1 path pays more of the longer the path is
(docs/performance.md, thirteenth pass).

``--burst N`` times a burst instead: N streams opened at once (the bench's
``stream-c100`` with N=100: 256 tokens at 5 ms from the fake upstream), once
to warm up, then ``--rounds`` times a second apart, and the same bursts to the
fake upstream directly. For each process's marks it prints when they fell
after the burst began, up to its last stream's first token (how many, first,
p10, p50, p90; each the median over the rounds), and beside them the callers'
first tokens: where a burst's first tokens wait, and behind what
(docs/performance.md, fourteenth pass).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench.floor import _http_message
from bench.procs import BenchError, Processes
from bench.targets import MODELS, ROOT, botline, current_build, start_upstream

CALL = "caller: call"
ANSWER = "caller: answer"
# A step is reported if it is seen in at least this share of the calls (a mark of
# something else, a heartbeat's frames, now and then falls between two others).
_SEEN = 0.5


@dataclass(frozen=True)
class Step:
    """Two marks in a row, over the calls: how long between them."""

    start: str
    end: str
    calls: int
    p50_us: float
    at_us: float  # median time of ``start`` after the call: the step's place on the path


def _read_answer(sock: socket.socket, buffer: bytearray) -> None:
    """Read one whole HTTP/1.1 answer off ``sock`` (by Content-Length); it must be a 200."""
    while (message := _http_message(buffer)) is None:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the connection closed mid-answer")
        buffer += chunk
    head, _ = message
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"answered {head[:200]!r}")


def calls(
    url: str, headers: Mapping[str, str], count: int, *, warm_up: int = 200, idle_s: float = 0.0
) -> list[tuple[int, int]]:
    """``count`` whole answers one at a time over one kept-alive connection: each call's
    (sent, answered) on the monotonic clock, in ns. ``idle_s``: busy waiting between calls
    (this caller's core stays awake; the other processes' go idle)."""
    parts = urlsplit(url)
    body = orjson.dumps({"model": MODELS["whole"], "messages": [{"role": "user", "content": "hi"}]})
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
    request = "\r\n".join(head).encode() + body
    timed = []
    buffer = bytearray()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warm_up + count):
            sent = time.monotonic_ns()
            sock.sendall(request)
            _read_answer(sock, buffer)
            answered = time.monotonic_ns()
            if i >= warm_up:
                timed.append((sent, answered))
            until = time.perf_counter() + idle_s
            while time.perf_counter() < until:
                pass
    return timed


def steps(marks: list[tuple[int, str]], timed: list[tuple[int, int]]) -> list[Step]:
    """Each call's marks between its send and its answer, paired in time order; the
    steps seen in at least half of the calls, in path order."""
    marks = sorted(marks)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    offsets: dict[tuple[str, str], list[float]] = defaultdict(list)
    at = 0
    for sent, answered in timed:
        while at < len(marks) and marks[at][0] < sent:
            at += 1
        inside = [(sent, CALL)]
        while at < len(marks) and marks[at][0] <= answered:
            inside.append(marks[at])
            at += 1
        inside.append((answered, ANSWER))
        for (t1, first), (t2, second) in itertools.pairwise(inside):
            durations[first, second].append((t2 - t1) / 1000)
            offsets[first, second].append((t1 - sent) / 1000)
    found = [
        Step(a, b, len(d), statistics.median(d), statistics.median(offsets[a, b]))
        for (a, b), d in durations.items()
        if len(d) >= _SEEN * len(timed)
    ]
    return sorted(found, key=lambda step: step.at_us)


@dataclass(frozen=True)
class Spread:
    """One mark over the bursts: when it fell after each burst began, in ms; each
    figure the median over the bursts."""

    label: str
    count: float
    first_ms: float
    p10_ms: float
    p50_ms: float
    p90_ms: float


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spreads(marks: list[tuple[int, str]], windows: list[tuple[int, int]]) -> list[Spread]:
    """Each label's marks within each burst (from its start to its last first token,
    ``windows`` as (start, end) in ns), in order of the median first one."""
    per_label: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for start, end in windows:
        offsets: dict[str, list[float]] = defaultdict(list)
        for ns, label in marks:
            if start <= ns <= end:
                offsets[label].append((ns - start) / 1e6)
        for label, found in offsets.items():
            found.sort()
            row = (len(found), found[0], *(_quantile(found, q) for q in (0.1, 0.5, 0.9)))
            per_label[label].append(row)
    rows = [
        Spread(label, *(statistics.median(column) for column in zip(*found, strict=True)))
        for label, found in per_label.items()
        # A label missing from most bursts is something else that ran meanwhile.
        if len(found) * 2 > len(windows)
    ]
    return sorted(rows, key=lambda row: row.first_ms)


def _has_text(data: bytes) -> bool:
    """Whether an OpenAI stream chunk carries text (a role-only first chunk does not),
    as the bench's load generator counts a first token."""
    if data.strip() == b"[DONE]":
        return False
    choices = orjson.loads(data).get("choices") or ()
    return any((choice.get("delta") or {}).get("content") for choice in choices)


async def _one_stream(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str]) -> int:
    """One stream: when its first token came (monotonic ns); read to its end."""
    body = orjson.dumps(
        {"model": MODELS["stream"], "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    first = 0
    async with session.post(url, data=body, headers=dict(headers)) as response:
        if response.status != 200:
            raise BenchError(f"a stream was answered {response.status}")
        async for line in response.content:
            if not first and line.startswith(b"data:") and _has_text(line[5:]):
                first = time.monotonic_ns()
    if not first:
        raise BenchError("a stream ended without a token")
    return first


async def bursts(
    url: str, headers: Mapping[str, str], size: int, rounds: int
) -> list[tuple[int, list[int]]]:
    """A warm-up burst of ``size`` streams, then ``rounds`` of them a second apart:
    each timed one's start and its streams' first tokens (monotonic ns)."""
    timed = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for round_no in range(rounds + 1):
            start = time.monotonic_ns()
            firsts = await asyncio.gather(
                *(_one_stream(session, url, headers) for _ in range(size))
            )
            if round_no:
                timed.append((start, sorted(firsts)))
            await asyncio.sleep(1.0)
    return timed


def burst_report(rows: list[Spread], botline: list[float], direct: list[float]) -> str:
    """The marks' spreads, then the callers' first tokens (ms after each burst began)."""
    lines = [
        "A burst's first tokens (bench/timeline.py --burst): ms after the burst began, "
        "up to its last first token; medians over the rounds",
        f"{'mark':<34} {'n':>6} {'first':>8} {'p10':>8} {'p50':>8} {'p90':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row.label:<34} {row.count:6.0f} {row.first_ms:8.2f} {row.p10_ms:8.2f} "
            f"{row.p50_ms:8.2f} {row.p90_ms:8.2f}"
        )
    for name, firsts in (("botline", botline), ("direct", direct)):
        ordered = sorted(firsts)
        lines.append(
            f"first token, {name}: p10 {_quantile(ordered, 0.1):.1f}, "
            f"p50 {_quantile(ordered, 0.5):.1f}, p90 {_quantile(ordered, 0.9):.1f} ms "
            "(every timed burst's streams)"
        )
    return "\n".join(lines)


def _firsts_ms(timed: list[tuple[int, list[int]]]) -> list[float]:
    return [(first - start) / 1e6 for start, firsts in timed for first in firsts]


def read_marks(out: Path) -> list[tuple[int, str]]:
    """Every process's marks (``bench.marks`` files in ``out``)."""
    found = []
    for path in out.glob("marks.*"):
        for line in path.read_text().splitlines():
            ns, _, label = line.partition(" ")
            found.append((int(ns), label))
    return found


def report(found: list[Step], round_trip_us: float, direct: Mapping[str, float]) -> str:
    """The steps as a table, then the caller's round trip and the direct call's."""
    lines = [
        "A lone whole answer's path (bench/timeline.py): each step's median over the calls, µs",
        f"{'from':<34} {'to':<34} {'p50 µs':>8} {'share':>6} {'calls':>6}",
    ]
    for step in found:
        share = 100 * step.p50_us / round_trip_us
        lines.append(
            f"{step.start:<34} {step.end:<34} {step.p50_us:8.1f} {share:5.1f}% {step.calls:6d}"
        )
    lines.append(
        f"steps' medians add up to {sum(s.p50_us for s in found):.0f} µs; "
        f"the caller's round trip p50 {round_trip_us:.0f} µs"
    )
    said = ", ".join(f"{name} p50 {us:.0f} µs" for name, us in direct.items())
    lines.append(f"the fake upstream called directly by the same caller: {said}")
    return "\n".join(lines)


async def _burst_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as tmp:
        out = Path(tmp)
        async with Processes(ROOT / "bench" / "results" / "logs" / "timeline") as procs:
            upstream = await start_upstream(procs, "stream", tokens=256, delay_ms=5.0)
            wrap = [sys.executable, "-m", "bench.marks", str(out), "--"]
            async with botline(procs, {"stream": upstream}, current_build(), wrap=wrap) as target:
                route = target.routes["stream"]
                timed = await bursts(route.url, route.headers, args.burst, args.rounds)
            direct_url = f"{upstream.base_url}/chat/completions"
            direct = await bursts(direct_url, {}, args.burst, args.rounds)
        marks = read_marks(out)
    rows = spreads(marks, [(start, firsts[-1]) for start, firsts in timed])
    print(burst_report(rows, _firsts_ms(timed), _firsts_ms(direct)))
    return 0


async def _main(args: argparse.Namespace) -> int:
    if args.burst:
        return await _burst_main(args)
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as tmp:
        out = Path(tmp)
        async with Processes(ROOT / "bench" / "results" / "logs" / "timeline") as procs:
            upstream = await start_upstream(procs, "whole", tokens=32)
            direct_url = f"{upstream.base_url}/chat/completions"
            direct = {
                "back to back": await asyncio.to_thread(calls, direct_url, {}, args.requests),
                f"after {args.idle_ms:g} ms idle": await asyncio.to_thread(
                    calls, direct_url, {}, args.requests, idle_s=args.idle_ms / 1000
                ),
            }
            wrap = [sys.executable, "-m", "bench.marks", str(out), "--"]
            build = current_build()
            async with botline(procs, {"whole": upstream}, build, wrap=wrap) as target:
                route = target.routes["whole"]
                timed = await asyncio.to_thread(calls, route.url, route.headers, args.requests)
            # Stopped: each process wrote its marks as it exited.
        marks = read_marks(out)
    if not any(label.startswith("worker:") for _, label in marks):
        raise BenchError("no marks from the worker: did it exit cleanly?")
    found = steps(marks, timed)
    round_trip = statistics.median((b - a) / 1000 for a, b in timed)
    medians = {
        name: statistics.median((b - a) / 1000 for a, b in pairs) for name, pairs in direct.items()
    }
    print(report(found, round_trip, medians))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="timed calls, one at a time")
    parser.add_argument(
        "--idle-ms", type=float, default=1.0, help="the direct call's second run: idle between"
    )
    parser.add_argument(
        "--burst", type=int, default=0, help="N streams opened at once instead of lone answers"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--burst: timed bursts")
    try:
        return asyncio.run(_main(parser.parse_args(argv)))
    except BenchError as exc:
        print(f"bench.timeline: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
