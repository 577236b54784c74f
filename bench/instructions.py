"""``python -m bench.instructions``: instructions per whole answer, gateway and worker.

CPU time from ``/proc`` is what the benchmark reports, but on a shared machine
the same build moves by 10-30 % between runs (docs/performance.md), more than
most single cuts save. This counts instructions instead: the gateway and the
worker run under valgrind's callgrind, which executes every instruction of
the process in its own simulator and counts it, whatever else the machine is
doing. The same build gives the same count to within about 2 % (timers and
the periodic tasks that run while the requests go by); that is the size of a
change this can judge.

One target at a time, as the benchmark starts it (``bench.targets.botline``:
defaults, its own namespace, a fake upstream answering 32 tokens at once),
each process under ``valgrind --tool=callgrind --instr-atstart=no``: nothing
is counted while it starts or warms up. Then ``--requests`` whole answers,
one at a time (``--concurrency N``: N callers, each asking again when
answered), uncounted (the first-use costs); counting is switched on
(``callgrind_control -i on``) for the next ``--requests``, and the counts are
dumped (``callgrind_control -d``) and divided by them. Callgrind runs code
about 50x slower than the CPU: 300 requests take about half a minute per
target, each start about as long.

One at a time, a request's objects are freed before the next one's are made.
With many in flight, the garbage collector walks the live ones and moves
them to older generations, and the full collections that follow walk
everything the process holds: a cost that shows only with ``--concurrency``
above 1, and enough requests for several full collections (``--concurrency
64 --requests 3000``; docs/performance.md, ninth pass).

What is counted is user-space instructions, the interpreter's and the C
libraries' (uvloop, pydantic-core, aiohttp's parser): not the kernel's work
in system calls, not RabbitMQ or Redis, and not time spent waiting.

``--baseline-commit REV`` counts a build of REV too (``bench.baseline``), the
targets alternating round by round, and prints each process's change.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench import baseline
from bench.procs import BenchError, Processes, kill_leftovers
from bench.targets import (
    MODELS,
    ROOT,
    Build,
    Route,
    Upstream,
    botline,
    current_build,
    start_upstream,
)

PROCESSES = ("gateway", "worker")
# Callgrind's start-up is slow (every function is translated as it is first run).
_START_S = 600.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=300, help="counted per round")
    parser.add_argument("--rounds", type=int, default=2, help="starts of each target")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="callers asking at once (default 1); costs that grow with the requests in "
        "flight, such as the garbage collector's, show only above 1",
    )
    parser.add_argument("--baseline-commit", metavar="REV", help="also count a build of REV")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.concurrency < 1:
        parser.error("--requests, --rounds and --concurrency must be at least 1")
    return args


async def _answers(
    session: aiohttp.ClientSession, route: Route, count: int, concurrency: int = 1
) -> None:
    """``count`` whole answers, ``concurrency`` callers each asking again when answered."""
    body = {"model": MODELS["whole"], "messages": [{"role": "user", "content": "hi"}]}
    left = count

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(route.url, json=body, headers=route.headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise BenchError(f"HTTP {resp.status}: {text[:300]}")

    await asyncio.gather(*(caller() for _ in range(min(concurrency, count))))


async def _callgrind_control(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)}: {out.decode().strip()}")


def counted(dump: Path) -> int:
    """The instructions a callgrind dump holds (its ``summary:`` line)."""
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"{dump}: no summary line")


async def count_round(
    procs: Processes,
    upstreams: dict[str, Upstream],
    build: Build,
    requests: int,
    out: Path,
    concurrency: int = 1,
) -> dict[str, float]:
    """One start of ``build``: instructions per whole answer, by process."""
    where = out / build.label.replace("@", "-")
    where.mkdir(parents=True, exist_ok=True)
    wrap = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={where}/%p.out",
    ]
    async with botline(procs, upstreams, build, wrap=wrap, start_s=_START_S) as target:
        pids = {name: target.groups()[name][0] for name in PROCESSES}
        timeout = aiohttp.ClientTimeout(total=120 + 5 * concurrency)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await _answers(session, target.routes["whole"], requests, concurrency)
            for pid in pids.values():
                await _callgrind_control("-i", "on", str(pid))
            await _answers(session, target.routes["whole"], requests, concurrency)
            for pid in pids.values():
                await _callgrind_control("-d", str(pid))
        # The first dump of each process is its counted window; the last, written as
        # it exits, is not read.
        return {name: counted(where / f"{pid}.out.1") / requests for name, pid in pids.items()}


async def _main(args: argparse.Namespace) -> int:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        out = Path(tmp)
        async with Processes(ROOT / "bench" / "results" / "logs" / "instructions") as procs:
            builds = [current_build()]
            if args.baseline_commit:
                builds.append(await baseline.build(procs, args.baseline_commit))
            upstreams = {"whole": await start_upstream(procs, "whole", tokens=32)}
            found: dict[str, list[dict[str, float]]] = {b.label: [] for b in builds}
            for round_ in range(1, args.rounds + 1):
                for build in builds:
                    counts = await count_round(
                        procs, upstreams, build, args.requests, out, args.concurrency
                    )
                    found[build.label].append(counts)
                    said = ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items())
                    print(f"[{round_}/{args.rounds}] {build.label}: {said}", file=sys.stderr)
    print(report(found, args.requests, args.concurrency))
    return 0


def report(found: dict[str, list[dict[str, float]]], requests: int, concurrency: int = 1) -> str:
    """The table: millions of instructions per whole answer, median of the rounds."""
    lines = [
        f"Instructions per whole answer (millions; callgrind, c={concurrency}, {requests} answers"
        " a round,"
        " median of the rounds; user space only)",
        f"{'target':<26} {'gateway':>9} {'worker':>9} {'both':>9}   rounds (gateway + worker)",
    ]
    first: dict[str, float] | None = None
    for label, rounds in found.items():
        med = {p: statistics.median(r[p] for r in rounds) for p in PROCESSES}
        med["both"] = med["gateway"] + med["worker"]
        each = "  ".join(f"{r['gateway'] / 1e6:.3f} + {r['worker'] / 1e6:.3f}" for r in rounds)
        cells = " ".join(f"{med[k] / 1e6:9.3f}" for k in (*PROCESSES, "both"))
        lines.append(f"{label:<26} {cells}   {each}")
        if first is None:
            first = med
        else:
            change = " ".join(
                f"{(first[k] / med[k] - 1) * 100:+8.1f}%" for k in (*PROCESSES, "both")
            )
            lines.append(f"{'  change against it':<26} {change}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.instructions``; 1 when something did not start."""
    args = _parse(argv)
    try:
        return asyncio.run(_main(args))
    except BenchError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
