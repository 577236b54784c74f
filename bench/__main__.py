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
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report, sysinfo
from bench.procs import BenchError, Processes, kill_leftovers
from bench.targets import (
    LITELLM_WORKERS,
    ROOT,
    Target,
    botline,
    direct,
    ensure_litellm,
    litellm,
    litellm_version,
    start_upstream,
)
from bench.workloads import Plan, aggregate, plan, run_all

TARGETS = ("direct", "botline", "litellm")


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
        help="comma-separated subset of direct,botline,litellm (default: all)",
    )
    parser.add_argument(
        "--workloads",
        default="",
        help="comma-separated subset of the plan's workloads, e.g. whole-c1,stream-c100 "
        "(default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where results go"
    )
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _processes(wanted: list[str]) -> dict[str, str]:
    said = {
        "direct": "the fake upstream called directly (no proxy)",
        "botline": "2 processes (1 gateway + 1 worker), with the running RabbitMQ and Redis",
        "litellm": f"LiteLLM proxy, {LITELLM_WORKERS} uvicorn worker processes "
        "(+1 supervisor), no database, no callbacks",
    }
    return {name: said[name] for name in wanted}


async def _measure(args: argparse.Namespace, plan_: Plan, stamp: str) -> dict[str, Any]:
    """Start everything, run every workload, stop everything; returns the raw results."""
    started = time.time()
    async with Processes(args.out / "logs" / stamp) as procs:
        version = "not run"
        if "litellm" in args.targets:
            await ensure_litellm(procs)
            version = await litellm_version()
        info = await sysinfo.collect(version)
        print(report.header(info, plan_, _processes(args.targets)), flush=True)
        upstreams = {
            role: await start_upstream(procs, role, tokens=tokens, delay_ms=delay)
            for role, (tokens, delay) in plan_.upstreams.items()
        }
        async with contextlib.AsyncExitStack() as stack:
            targets: list[Target] = []
            if "direct" in args.targets:
                targets.append(direct(upstreams))
            if "botline" in args.targets:
                targets.append(await stack.enter_async_context(botline(procs, upstreams)))
            if "litellm" in args.targets:
                work_dir = args.out / "logs" / stamp
                targets.append(await stack.enter_async_context(litellm(procs, upstreams, work_dir)))
            print(f"all targets ready after {time.time() - started:.0f} s", file=sys.stderr)
            runs = await run_all(procs, plan_, targets, upstreams)
    return {
        "info": info,
        "targets": {t.name: t.processes for t in targets},
        "runs": runs,
        "summary": aggregate(runs, targets),
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
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic()
    results = await _measure(args, plan_, stamp)
    summary = results["summary"]
    found = report.floors(summary, plan_)
    print()
    print(report.whole_table(summary, plan_))
    print()
    print(report.stream_table(summary, plan_))
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
