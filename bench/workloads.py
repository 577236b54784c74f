"""What is run, in which order, what is read around each run, and how rounds combine.

Each workload is run against every target in turn, and that rotation is repeated (the
starting target moving on each round), so that whatever drifts on the machine during the
benchmark hits all three alike; per target, the median over rounds is kept. An overhead
("added p50") is taken within a round, against the direct run next to it, and then the
median over rounds.

Around each run the parent reads, between the load generator's warm-up and its measured
phase, each target process's CPU time and resident memory, then CPU time again when the
measured phase is done; memory is read again when every stream is open (and sampled for
its peak all along).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from bench.load import Spec
from bench.procs import (
    BenchError,
    Proc,
    Processes,
    cpu_seconds,
    listener_pids,
    machine_cpu_seconds,
    rss_bytes,
)
from bench.stats import median
from bench.targets import MODELS, ROOT, Target, Upstream
from shared.settings import CommonSettings

# whole: answers in one body; stream: SSE; slow: whole answers from a slow upstream.
Kind = Literal["whole", "stream", "slow"]
_PROMPT = [{"role": "user", "content": "Tell me something."}]
# Read each process's memory this often during a run, for its peak.
_SAMPLE_S = 0.1
# After the warm-up, before reading the servers at rest: let closed connections go.
_SETTLE_S = 0.5


@dataclass(frozen=True)
class Workload:
    """One kind of load at one concurrency."""

    kind: Kind
    concurrency: int
    requests: int  # measured requests per run, at most
    duration_s: float  # and no new one after this long
    warmup: int
    timeout_s: float  # one request, at most
    rounds: int | None = None  # None: the plan's
    # 0: every caller starts at once (a burst). Otherwise each caller's first request
    # waits a random part of this, and each caller then asks again as soon as its answer
    # ends: ``concurrency`` requests stay open, arriving spread out (a steady load).
    stagger_s: float = 0.0
    # Run only when named in --workloads (with the targets it compares, e.g. botline-p2).
    optional: bool = False

    @property
    def key(self) -> str:
        """A stable name, e.g. ``whole-c16`` or ``stream-c100-steady``."""
        return f"{self.kind}-c{self.concurrency}" + ("-steady" if self.stagger_s else "")

    @property
    def label(self) -> str:
        """How tables and charts name it, e.g. ``c=100`` or ``c=100 steady``."""
        slow = ", slow upstream" if self.kind == "slow" else ""
        return f"c={self.concurrency}" + (" steady" if self.stagger_s else "") + slow

    def body(self) -> dict[str, Any]:
        """The OpenAI request body, the same for every target."""
        body: dict[str, Any] = {"model": MODELS[self.kind], "messages": _PROMPT}
        if self.kind == "stream":
            return {**body, "stream": True, "stream_options": {"include_usage": True}}
        return {**body, "stream": False}


@dataclass(frozen=True)
class Plan:
    """Everything a run of the benchmark does."""

    quick: bool
    rounds: int
    # Per upstream role: (tokens per reply, delay per token in ms).
    upstreams: dict[str, tuple[int, float]]
    workloads: list[Workload]

    # --rounds, when given, applies to every workload.
    rounds_forced: bool = False
    # Whole answers at c=1 once more, the targets interleaved (bench.paired): cycles, and
    # requests per target per cycle.
    paired: tuple[int, int] = (12, 300)

    def tokens(self, kind: Kind) -> int:
        """Tokens in each answer of a workload of this kind."""
        return self.upstreams[kind][0]

    def rounds_of(self, workload: Workload) -> int:
        """How many rotations over the targets ``workload`` gets."""
        if self.rounds_forced or workload.rounds is None:
            return self.rounds
        return workload.rounds


def plan(*, quick: bool, rounds: int | None = None) -> Plan:
    """The full benchmark, or the few-second ``--quick`` one that only proves it works."""
    if quick:
        return Plan(
            quick=True,
            rounds=rounds or 1,
            rounds_forced=rounds is not None,
            upstreams={"whole": (32, 0.0), "stream": (32, 5.0), "slow": (32, 5.0)},
            paired=(3, 30),
            workloads=[
                Workload("whole", 1, requests=300, duration_s=1.5, warmup=20, timeout_s=30),
                Workload("whole", 16, requests=2000, duration_s=1.5, warmup=32, timeout_s=30),
                Workload("stream", 20, requests=40, duration_s=10, warmup=20, timeout_s=60),
                Workload(
                    "stream", 20, requests=40, duration_s=10, warmup=0, timeout_s=60, stagger_s=0.3
                ),
                Workload(
                    "slow", 32, requests=300, duration_s=1.5, warmup=32, timeout_s=30, optional=True
                ),
            ],
        )
    return Plan(
        quick=False,
        rounds=rounds or 3,
        rounds_forced=rounds is not None,
        upstreams={"whole": (32, 0.0), "stream": (256, 5.0), "slow": (32, 10.0)},
        workloads=[
            Workload("whole", 1, requests=20_000, duration_s=5, warmup=200, timeout_s=30),
            Workload("whole", 16, requests=50_000, duration_s=5, warmup=400, timeout_s=30),
            Workload("whole", 64, requests=50_000, duration_s=5, warmup=640, timeout_s=30),
            # One stream per connection. LiteLLM needs ~0.75 ms of CPU per streamed token
            # here, so its 1000 x 256 tokens take over two minutes on two cores: two rounds
            # of that, not three, keep the full run near 16 minutes.
            Workload("stream", 100, requests=100, duration_s=60, warmup=20, timeout_s=300),
            # The same 100 streams kept open, arrivals spread over one stream's length
            # (~1.4 s), four streams per caller: what a busy service sees all day.
            Workload(
                "stream",
                100,
                requests=400,
                duration_s=60,
                warmup=20,
                timeout_s=300,
                stagger_s=1.4,
            ),
            Workload(
                "stream", 1000, requests=1000, duration_s=60, warmup=20, timeout_s=300, rounds=2
            ),
            # Whole answers from an upstream taking ~0.35 s each: at most ~370 req/s at 128
            # callers, which leaves this 2-core machine room, so that `--targets
            # direct,botline,botline-p2 --workloads slow-c128` shows what a second process
            # of each service changes when the CPU is not the limit.
            Workload(
                "slow", 128, requests=5000, duration_s=10, warmup=256, timeout_s=60, optional=True
            ),
        ],
    )


@contextlib.asynccontextmanager
async def _within(seconds: float, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout``, failing as a :class:`BenchError` that names ``what``."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise BenchError(f"{what} did not finish within {seconds:.0f} s") from None


@functools.cache
def shared_servers() -> dict[str, list[int]]:
    """The RabbitMQ and Redis botline uses: the processes listening on their URLs' ports.

    Found by port, not by name: tests' private servers (``beam.smp``, ``redis-server``
    too) may run on this machine, and their CPU is not botline's. Found once: scanning
    every process's descriptors costs CPU.
    """
    settings = CommonSettings()
    found = {}
    for name, url, default in (
        ("rabbitmq", settings.amqp_url, 5672),
        ("redis", settings.redis_url, 6379),
    ):
        port = urlsplit(url.get_secret_value()).port or default
        found[name] = listener_pids(port)
    return found


def _context_groups(upstream: Upstream, load_pid: int) -> dict[str, list[int]]:
    """Processes read for context: the upstream, the servers, the client, this process.

    With the machine's busy time, they tell how much CPU went to processes outside the
    benchmark during a run (another job on the machine skews every figure).
    """
    return {
        "upstream": [upstream.proc.pid],
        **shared_servers(),
        "load generator": [load_pid],
        "orchestrator": [os.getpid()],
    }


def _cpu(groups: Mapping[str, list[int]]) -> dict[str, float]:
    return {name: cpu_seconds(pids) for name, pids in groups.items()}


def _rss(groups: Mapping[str, list[int]]) -> dict[str, int]:
    return {name: rss_bytes(pids) for name, pids in groups.items()}


async def _sample_peaks(groups: Callable[[], dict[str, list[int]]], peaks: dict[str, int]) -> None:
    while True:
        for name, value in _rss(groups()).items():
            peaks[name] = max(peaks.get(name, 0), value)
        await asyncio.sleep(_SAMPLE_S)


async def _next_event(proc_stdout: asyncio.StreamReader) -> dict[str, Any]:
    line = await proc_stdout.readline()
    if not line:
        raise BenchError("the load generator exited early")
    event: dict[str, Any] = orjson.loads(line)
    return event


async def _watch(watched: Sequence[Proc], load: Proc) -> None:
    """End the load generator at once if a measured process dies: the run is void."""
    exits = [asyncio.create_task(p.process.wait()) for p in watched]
    try:
        await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in exits:
            task.cancel()
    with contextlib.suppress(ProcessLookupError):
        load.process.kill()  # its stdout closes, and run_one says which process died


async def run_one(
    procs: Processes,
    target: Target,
    workload: Workload,
    upstream: Upstream,
    tokens: int,
) -> dict[str, Any]:
    """One measured run of ``workload`` against ``target``, with its process readings."""
    spec = Spec(
        url=target.routes[workload.kind].url,
        headers=target.routes[workload.kind].headers,
        body=workload.body(),
        stream=workload.kind == "stream",
        concurrency=workload.concurrency,
        requests=workload.requests,
        duration_s=workload.duration_s,
        warmup=workload.warmup,
        expect_tokens=tokens,
        timeout_s=workload.timeout_s,
        stagger_s=workload.stagger_s,
    )
    name = f"load-{workload.key}-{target.name}"
    argv = [sys.executable, "-m", "bench.load"]
    proc = await procs.start(name, argv, cwd=ROOT, stdin_pipe=True, stdout_pipe=True)
    context = _context_groups(upstream, proc.pid)
    stdin, stdout = proc.process.stdin, proc.process.stdout
    assert stdin is not None
    assert stdout is not None
    peaks: dict[str, int] = {}
    sampler: asyncio.Task[None] | None = None
    watched = [*target.procs, upstream.proc]
    watchdog = asyncio.create_task(_watch(watched, proc))
    # Warm-up and measured phase are each bounded by request count, deadline and timeout;
    # this bounds the whole run in case the load generator itself wedges.
    budget = 2 * workload.timeout_s + workload.duration_s + 60
    try:
        async with _within(budget, name):
            stdin.write(spec.dumps())
            await stdin.drain()
            event = await _next_event(stdout)
            if event.get("event") != "warmed":
                raise BenchError(f"unexpected load generator event {event}")
            await asyncio.sleep(_SETTLE_S)
            cpu_before, context_before = _cpu(target.groups()), _cpu(context)
            machine_before = machine_cpu_seconds()
            rss_idle = _rss(target.groups())
            sampler = asyncio.create_task(_sample_peaks(target.groups, peaks))
            stdin.write(b"go\n")
            await stdin.drain()
            rss_open: dict[str, int] | None = None
            cpu_after: dict[str, float] = {}
            context_after: dict[str, float] = {}
            machine_after = machine_before
            while True:
                event = await _next_event(stdout)
                if event["event"] == "all_open":
                    rss_open = _rss(target.groups())
                elif event["event"] == "done":
                    cpu_after, context_after = _cpu(target.groups()), _cpu(context)
                    machine_after = machine_cpu_seconds()
                elif event["event"] == "result":
                    break
    except BenchError:
        _check_alive(watched)  # a dead target explains the failure better
        raise
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await procs.stop(proc, timeout=5)
    event.pop("event")
    cpu = {k: cpu_after.get(k, v) - v for k, v in cpu_before.items()}
    context_cpu = {k: context_after.get(k, v) - v for k, v in context_before.items()}
    machine = machine_after.busy - machine_before.busy
    return {
        "workload": workload.key,
        "target": target.name,
        "load": event,
        "cpu_s": cpu,
        "context_cpu_s": context_cpu,
        "machine_cpu_s": machine,
        # Busy CPU of processes the benchmark did not start or read: noise from elsewhere.
        "foreign_cpu_s": machine - sum(cpu.values()) - sum(context_cpu.values()),
        # Of it, the hypervisor's: this VM's cores given to other machines on the host.
        "steal_cpu_s": machine_after.steal - machine_before.steal,
        "rss_idle": rss_idle,
        "rss_open": rss_open,
        "rss_peak": peaks,
    }


def _progress(run: dict[str, Any], round_no: int, rounds: int) -> str:
    load = run["load"]
    main = load["ttft_ms"] if run["workload"].startswith("stream") else load["latency_ms"]
    p50, p99 = main["p50"], main["p99"]
    timing = f"p50 {p50:.2f} ms p99 {p99:.2f} ms" if p50 is not None else "no answers"
    return (
        f"[{round_no}/{rounds}] {run['workload']:12} {run['target']:8} "
        f"{load['ok']:6} ok {load['errors']:4} err {load['rps']:9.1f}/s {timing}"
    )


async def run_all(
    procs: Processes,
    plan_: Plan,
    targets: Sequence[Target],
    upstreams: Mapping[str, Upstream],
) -> list[dict[str, Any]]:
    """Every workload, every round, every target in turn; returns the runs in order."""
    runs: list[dict[str, Any]] = []
    for workload in plan_.workloads:
        rounds = plan_.rounds_of(workload)
        for round_no in range(rounds):
            # Start each round on the next target, so none always runs first.
            shift = round_no % len(targets)
            for target in [*targets[shift:], *targets[:shift]]:
                if workload.kind not in target.routes:  # the floor: whole answers only
                    continue
                started = time.monotonic()
                run = await run_one(
                    procs,
                    target,
                    workload,
                    upstreams[workload.kind],
                    plan_.tokens(workload.kind),
                )
                run["round"] = round_no
                run["seconds"] = time.monotonic() - started
                runs.append(run)
                print(_progress(run, round_no + 1, rounds), file=sys.stderr, flush=True)
                _check_alive([*target.procs, *(up.proc for up in upstreams.values())])
    return runs


# Not in the interleaved c=1 run: ~11 ms an answer would make its blocks ten times the
# others', and no floor compares botline with LiteLLM at c=1.
_NOT_PAIRED = ("litellm",)


async def run_paired(
    procs: Processes,
    targets: Sequence[Target],
    workload: Workload,
    upstream: Upstream,
    tokens: int,
    *,
    cycles: int,
    block: int,
) -> dict[str, Any] | None:
    """``workload`` (whole answers, c=1) with the targets interleaved (``bench.paired``);
    None without the direct call and one other target to compare."""
    paired = [t for t in targets if workload.kind in t.routes and t.name not in _NOT_PAIRED]
    if "direct" not in {t.name for t in paired} or len(paired) < 2:
        return None
    specs = {
        t.name: Spec(
            url=t.routes[workload.kind].url,
            headers=t.routes[workload.kind].headers,
            body=workload.body(),
            stream=False,
            concurrency=1,
            requests=block,
            duration_s=0,
            warmup=workload.warmup,
            expect_tokens=tokens,
            timeout_s=workload.timeout_s,
        )
        for t in paired
    }
    asked = {
        "specs": {name: vars(spec) for name, spec in specs.items()},
        "cycles": cycles,
        "block": block,
    }
    name = f"load-{workload.key}-paired"
    argv = [sys.executable, "-m", "bench.paired"]
    proc = await procs.start(name, argv, cwd=ROOT, stdin_pipe=True, stdout_pipe=True)
    stdin, stdout = proc.process.stdin, proc.process.stdout
    assert stdin is not None
    assert stdout is not None
    measured = [p for t in paired for p in t.procs]
    watchdog = asyncio.create_task(_watch([*measured, upstream.proc], proc))
    # Every request is bounded by its timeout; this bounds the whole in case it wedges.
    budget = 120 + 2 * workload.timeout_s * len(paired)
    try:
        async with _within(budget, name):
            stdin.write(orjson.dumps(asked) + b"\n")
            await stdin.drain()
            event = await _next_event(stdout)
    except BenchError:
        _check_alive(measured)
        raise
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await procs.stop(proc, timeout=5)
    event.pop("event")
    direct = event["p50_ms"]["direct"]
    added = {
        target: [
            None if mine is None or theirs is None else mine - theirs
            for mine, theirs in zip(p50s, direct, strict=True)
        ]
        for target, p50s in event["p50_ms"].items()
        if target != "direct"
    }
    return {
        "workload": workload.key,
        "cycles": cycles,
        "block": block,
        **event,
        "added_ms": added,
        "added_p50_ms": {target: median(cycles_) for target, cycles_ in added.items()},
    }


def _check_alive(procs: Sequence[Proc]) -> None:
    """Stop the benchmark if a process it measures has exited: what follows would be noise."""
    dead = [p for p in procs if not p.running]
    if dead:
        said = "; ".join(
            # A negative code is the signal that ended it (e.g. -9: SIGKILL from elsewhere).
            f"{p.name} exited with code {p.process.returncode}:\n{p.log_tail()}"
            for p in dead
        )
        raise BenchError(f"stopped: {said}")


# --- combining rounds -----------------------------------------------------------
def _main_key(workload_key: str) -> str:
    return "ttft_ms" if workload_key.startswith("stream") else "latency_ms"


def _memory_per_stream(run: dict[str, Any], groups: Sequence[str]) -> float | None:
    """Bytes of ``groups``' growth per open stream: all open vs at rest before."""
    if not groups or not all(g in run["rss_idle"] for g in groups):
        return None
    idle = sum(run["rss_idle"][g] for g in groups)
    # Never all open at once: the peak, over the most that were.
    busy = run["rss_open"] if run["rss_open"] is not None else run["rss_peak"]
    streams = run["load"]["peak_open"]
    return (sum(busy.get(g, 0) for g in groups) - idle) / streams if streams else None


def _all_workers_served(cpu_s: Mapping[str, float]) -> bool | None:
    """Whether each of a target's worker processes (groups ``worker1``, ``worker2``...:
    LiteLLM's) did at least half its even share of their work in a run; None for a
    target without several. LiteLLM's uvicorn workers share one listening socket, and
    the kernel may hand every connection of a run to one of them."""
    workers = [v for k, v in cpu_s.items() if re.fullmatch(r"worker\d+", k)]
    if len(workers) < 2 or not sum(workers):
        return None
    return min(workers) >= sum(workers) / (2 * len(workers))


def aggregate(
    runs: Sequence[dict[str, Any]], targets: Sequence[Target]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per workload, per target: the median over rounds of each figure (see module doc)."""
    memory_groups = {t.name: t.memory_groups for t in targets}
    by_key: dict[tuple[str, str, int], dict[str, Any]] = {
        (r["workload"], r["target"], r["round"]): r for r in runs
    }
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in dict.fromkeys(r["workload"] for r in runs):
        main = _main_key(workload)
        out[workload] = {}
        for target in dict.fromkeys(r["target"] for r in runs if r["workload"] == workload):
            mine = [r for r in runs if r["workload"] == workload and r["target"] == target]
            added50, added99 = [], []
            for run in mine:
                base = by_key.get((workload, "direct", run["round"]))
                mine50, mine99 = run["load"][main]["p50"], run["load"][main]["p99"]
                if target != "direct" and base is not None and mine50 is not None:
                    base50, base99 = base["load"][main]["p50"], base["load"][main]["p99"]
                    if base50 is not None:
                        added50.append(mine50 - base50)
                        added99.append(mine99 - base99)
            errors: Counter[str] = Counter()
            for run in mine:
                errors.update(run["load"]["error_kinds"])
            groups = list(mine[0]["cpu_s"]) if mine else []
            cpu_1k = {
                g: median([_per_1k(r["cpu_s"][g], r["load"]["tokens"]) for r in mine])
                for g in groups
            }
            context_1k = {
                g: median([_per_1k(r["context_cpu_s"][g], r["load"]["tokens"]) for r in mine])
                for g in (mine[0]["context_cpu_s"] if mine else {})
            }
            context_ms = {
                g: median(
                    [
                        r["context_cpu_s"][g] * 1000 / r["load"]["ok"]
                        for r in mine
                        if r["load"]["ok"]
                    ]
                )
                for g in (mine[0]["context_cpu_s"] if mine else {})
            }
            memory_by_group = {}
            for g in groups:
                found = [m for m in (_memory_per_stream(r, (g,)) for r in mine) if m is not None]
                memory_by_group[g] = max(found) if found else None
            memory = [_memory_per_stream(r, memory_groups.get(target, ())) for r in mine]
            # The figure shown is the worst round's: so are the streams it was divided by.
            rounds_with_memory = [(m, i) for i, m in enumerate(memory) if m is not None]
            worst_memory, worst = max(rounds_with_memory, default=(None, None))
            spread = [_all_workers_served(r["cpu_s"]) for r in mine]
            served = [r for r, all_served in zip(mine, spread, strict=True) if all_served]
            out[workload][target] = {
                "rounds": len(mine),
                # With several worker processes: the rounds all of them served (None:
                # not several), and their median req/s (None: not several, or no such round).
                "rounds_all_workers": (None if all(s is None for s in spread) else len(served)),
                "rps_all_workers": median([r["load"]["rps"] for r in served]),
                "ok": sum(r["load"]["ok"] for r in mine),
                "errors": sum(r["load"]["errors"] for r in mine),
                "error_kinds": dict(errors),
                "rps": median([r["load"]["rps"] for r in mine]),
                "p50_ms": median([r["load"][main]["p50"] for r in mine]),
                "p99_ms": median([r["load"][main]["p99"] for r in mine]),
                "added_p50_ms": median(added50),
                "added_p99_ms": median(added99),
                "gap_p50_ms": median([r["load"]["gap_ms"]["p50"] for r in mine]),
                "gap_p99_ms": median([r["load"]["gap_ms"]["p99"] for r in mine]),
                "chunks_per_stream": median(
                    [r["load"]["chunks"] / r["load"]["ok"] for r in mine if r["load"]["ok"]]
                ),
                "cpu_s_per_1k_tokens": cpu_1k,
                "cpu_s_per_1k_tokens_total": median(
                    [_per_1k(sum(r["cpu_s"].values()), r["load"]["tokens"]) for r in mine]
                )
                if groups
                else None,
                "cpu_ms_per_request_by_group": {
                    g: median(
                        [r["cpu_s"][g] * 1000 / r["load"]["ok"] for r in mine if r["load"]["ok"]]
                    )
                    for g in groups
                },
                "cpu_ms_per_request": median(
                    [
                        sum(r["cpu_s"].values()) * 1000 / r["load"]["ok"]
                        for r in mine
                        if r["load"]["ok"]
                    ]
                )
                if groups
                else None,
                "context_cpu_s_per_1k_tokens": context_1k,
                # RabbitMQ, Redis, the upstream... per request (median over rounds): the
                # servers' share, read from /proc like the target's own processes.
                "context_cpu_ms_per_request": context_ms,
                "memory_per_stream_bytes_by_group": memory_by_group,
                # The worst round: memory freed by a run is not always given back to the OS,
                # so later rounds can understate it.
                "memory_per_stream_bytes": worst_memory,
                "all_open": all(r["rss_open"] is not None for r in mine),
                "peak_open": (
                    mine[worst]["load"]["peak_open"]
                    if worst is not None
                    else max((r["load"]["peak_open"] for r in mine), default=0)
                ),
                "streams_started": (
                    mine[worst]["load"]["ok"] + mine[worst]["load"]["errors"]
                    if worst is not None
                    else None
                ),
            }
    return out


def _per_1k(seconds: float, tokens: int) -> float | None:
    return seconds * 1000 / tokens if tokens else None
