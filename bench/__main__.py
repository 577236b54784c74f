"""``python -m bench [--quick]``: botline vs LiteLLM vs the upstream called directly.

Prints versions and the machine, then a line per run on stderr while it goes, then the
tables and botline's floors (MET / MISSED: informational only); writes a PNG chart and the
raw results as JSON to ``bench/results/``, and each process's output to
``bench/results/logs/<run>/``.

Exit status: 0 when every target answered in every workload, 2 when one answered nothing
at all (the harness or a target is broken), 1 when something did not start, 130 on
Ctrl-C or SIGTERM (a second one kills what is left at once). Timings never decide it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import baseline, report, sysinfo
from bench.procs import BenchError, Processes, kill_leftovers
from bench.targets import (
    LITELLM_WORKERS,
    ROOT,
    Target,
    botline,
    current_build,
    direct,
    ensure_litellm,
    floor,
    litellm,
    litellm_version,
    start_upstream,
)
from bench.workloads import Plan, aggregate, plan, run_all, run_paired, shared_servers

TARGETS = ("direct", "floor", "floor-aiohttp", "floor-guarded", "botline", "litellm")
# Also accepted in --targets: botline-pN, botline with --processes N (gateway and worker).
_BOTLINE_PN = re.compile(r"^botline-p([2-9]|[1-9][0-9])$")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds per workload, one round (CI)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rotations over the targets, for every workload (default 3 but 2 at 1000 "
        "streams; --quick 1)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of direct,floor,floor-aiohttp,floor-guarded,botline,"
        "litellm (default: all); also "
        "botline-pN: botline's gateway and worker each run with --processes N",
    )
    parser.add_argument(
        "--baseline-commit",
        metavar="REV",
        help="also run botline as of this commit (e.g. 140364c), built once into "
        "bench/.baselines/, as the target botline@REV, next to this checkout's",
    )
    parser.add_argument(
        "--workloads",
        default="",
        help="comma-separated subset of the plan's workloads, e.g. whole-c1,stream-c100 "
        "(default: all but slow-c128, which runs only when named: 1 vs 2 processes on a slow "
        "upstream, with --targets direct,botline,botline-p2)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where results go"
    )
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = {t for t in args.targets if t not in TARGETS and not _BOTLINE_PN.match(t)}
    if unknown or not args.targets or len(set(args.targets)) != len(args.targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}, botline-pN")
    if args.baseline_commit and "botline" not in args.targets:
        parser.error("--baseline-commit runs beside the target botline: keep it in --targets")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _processes(wanted: list[str], baseline_commit: str | None) -> dict[str, str]:
    defaults = (
        "at its defaults, as `make run` starts it: no BOTLINE_* setting but the namespace and "
        "the endpoints (the fake upstreams' URLs, no cap declared)"
    )
    said = {
        "direct": "the fake upstream called directly (no proxy)",
        "floor": "bench.floor, the least path of botline's design: an HTTP front and a relay "
        "process, raw AMQP frames, two broker hops, no confirms, acks, keys, limits, usage, "
        "validation or logs (whole answers only; not a service: the floor under one)",
        "floor-aiohttp": "the same with aiohttp's server in the front, as the design card "
        "fixes for the gateway (one handler, no middleware)",
        "floor-guarded": "floor-aiohttp asking of RabbitMQ what botline's guarantees ask: "
        "confirmed mandatory jobs on a priority queue with per-message expiry, acked by the "
        "relay, answers through a direct exchange with an alternate",
        "litellm": f"LiteLLM proxy, {LITELLM_WORKERS} uvicorn worker processes "
        "(+1 supervisor), no database, no callbacks",
    }
    found = {}
    for name in wanted:
        match = _BOTLINE_PN.match(name)
        if name == "botline" or match:
            n = int(match[1]) if match else 1
            how = f"--processes {n} each (+1 parent each)" if n > 1 else "1 process each"
            found[name] = f"1 gateway + 1 worker, {how}, {defaults}; the running RabbitMQ, Redis"
            if name == "botline" and baseline_commit:
                found[f"botline@{baseline_commit}"] = (
                    f"the same, as of commit {baseline_commit} (its own build and venv)"
                )
        else:
            found[name] = said[name]
    return found


async def _measure(args: argparse.Namespace, plan_: Plan, stamp: str) -> dict[str, Any]:
    """Start everything, run every workload, stop everything; returns the raw results."""
    started = time.time()
    async with Processes(args.out / "logs" / stamp) as procs:
        version = "not run"
        if "litellm" in args.targets:
            await ensure_litellm(procs)
            version = await litellm_version()
        baseline_build = None
        if args.baseline_commit:
            baseline_build = await baseline.build(procs, args.baseline_commit)
        info = await sysinfo.collect(version)
        said = _processes(args.targets, baseline_build.label[8:] if baseline_build else None)
        print(report.header(info, plan_, said), flush=True)
        servers = ", ".join(f"{k} pid {v}" for k, v in shared_servers().items())
        print(f"servers read from /proc (the processes on their URLs' ports): {servers}")
        upstreams = {
            role: await start_upstream(procs, role, tokens=tokens, delay_ms=delay)
            for role, (tokens, delay) in plan_.upstreams.items()
            if any(w.kind == role for w in plan_.workloads)
        }
        async with contextlib.AsyncExitStack() as stack:
            targets: list[Target] = []
            for name in args.targets:
                match = _BOTLINE_PN.match(name)
                if name == "direct":
                    targets.append(direct(upstreams))
                elif name.startswith("floor"):
                    if "whole" in upstreams:  # whole answers only
                        guarded = name == "floor-guarded"
                        http = name.removeprefix("floor-") if "-" in name else "raw"
                        target = floor(procs, upstreams, "aiohttp" if guarded else http, guarded)
                        targets.append(await stack.enter_async_context(target))
                elif name == "litellm":
                    work_dir = args.out / "logs" / stamp
                    target = litellm(procs, upstreams, work_dir)
                    targets.append(await stack.enter_async_context(target))
                else:
                    n = int(match[1]) if match else 1
                    target = botline(procs, upstreams, current_build(), n)
                    targets.append(await stack.enter_async_context(target))
                    if name == "botline" and baseline_build is not None:
                        target = botline(procs, upstreams, baseline_build)
                        targets.append(await stack.enter_async_context(target))
            print(f"all targets ready after {time.time() - started:.0f} s", file=sys.stderr)
            runs = await run_all(procs, plan_, targets, upstreams)
            paired = None
            lone = [w for w in plan_.workloads if w.key == "whole-c1"]
            if lone:
                print("whole-c1 once more, the targets interleaved", file=sys.stderr)
                cycles, block = plan_.paired
                paired = await run_paired(
                    procs,
                    targets,
                    lone[0],
                    upstreams["whole"],
                    plan_.tokens("whole"),
                    cycles=cycles,
                    block=block,
                )
    return {
        "info": info,
        "targets": {t.name: t.processes for t in targets},
        "runs": runs,
        "summary": aggregate(runs, targets),
        "paired_c1": paired,
        "started": started,
        "finished": time.time(),
    }


async def _main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None

    def interrupted() -> None:
        if task.cancelling():
            # Asked twice: no more waiting for graceful stops.
            kill_leftovers()
            os._exit(130)
        # Cancel, so that every `finally` stops what it started and deletes botline's
        # namespace. Handled here rather than as KeyboardInterrupt: that may land outside
        # any `finally`, and SIGINT may even be ignored when started in the background.
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupted)
    plan_ = plan(quick=args.quick, rounds=args.rounds)
    if args.workloads:
        wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
        unknown = wanted - {w.key for w in plan_.workloads}
        if unknown:
            print(f"bench: no such workload: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 1
        plan_ = replace(plan_, workloads=[w for w in plan_.workloads if w.key in wanted])
    else:
        plan_ = replace(plan_, workloads=[w for w in plan_.workloads if not w.optional])
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic()
    results = await _measure(args, plan_, stamp)
    summary = results["summary"]
    found = report.floors(summary, plan_, results["paired_c1"])
    tables = (
        report.whole_table(summary, plan_),
        report.paired_table(results["paired_c1"]),
        report.stream_table(summary, plan_),
    )
    for table in tables:
        if table:  # a kind of workload this run did not have prints nothing
            print()
            print(table)
    print()
    print(report.floors_text(found))
    print(report.noise(results["runs"], int(results["info"]["machine"]["nproc"])))
    machine = results["info"]["machine"]
    subtitle = f"{machine['nproc']} cores, {machine['cpu']}" + (" (--quick)" if plan_.quick else "")
    png, raw = args.out / f"bench-{stamp}.png", args.out / f"bench-{stamp}.json"
    report.chart(summary, plan_, png, subtitle)
    results["plan"] = {
        "quick": plan_.quick,
        "rounds": plan_.rounds,
        "upstreams": plan_.upstreams,
        "workloads": [vars(w) for w in plan_.workloads],
    }
    results["floors"] = [vars(f) for f in found]
    results["argv"] = sys.argv
    # Whose CPU the RabbitMQ and Redis columns are: the processes on their ports.
    results["servers"] = shared_servers()
    report.write_json(raw, results)
    print(f"\nchart: {png}\nraw results: {raw}\nwall time: {time.monotonic() - wall:.1f} s")
    silent = [
        f"{w} / {t}" for w, cells in summary.items() for t, c in cells.items() if c["ok"] == 0
    ]
    if silent:
        print(f"no successful answer from: {', '.join(silent)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring for the exit status."""
    args = _parse(argv)
    try:
        return asyncio.run(_main(args))
    except BenchError as exc:  # what failed, without a traceback: the logs have the rest
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
