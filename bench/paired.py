"""Whole answers at c=1, the targets interleaved: ``python -m bench.paired``, run by the bench.

The c=1 floor compares botline's added latency with a baseline build's "in the same run".
Round by round, each target runs alone for seconds, one after the other, and on a shared
machine the speed moves 2-3x within minutes (docs/performance.md, eleventh pass): a
slow spell that falls on one target's turn decides the floor. Here the targets take
turns in blocks of ``block`` requests, ``cycles`` times, each cycle in a rotated order,
so every target meets the same spells; a block is long enough for its processes to be
warm, short enough (a second or so) that the machine holds still within it. Each
target's figure per cycle is its block's p50; what a target adds is its block's p50
less the direct call's in the same cycle, and the run's figure the median over cycles.

One JSON line on stdin: ``{"specs": {name: Spec}, "cycles": N, "block": M}`` (each
``Spec`` as ``bench.load`` takes it: the URL, headers, body, warm-up, expected tokens and
timeout count; its concurrency is 1 here). One JSON line on stdout:
``{"event": "result", "p50_ms": {name: [per cycle]}, "ok": {...}, "errors": {...}}``.
A process of its own, like ``bench.load``, with one connection per target.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import orjson

from bench.load import Spec, _emit, _Tally, _whole
from bench.stats import percentile


async def run(specs: dict[str, Spec], cycles: int, block: int) -> dict[str, Any]:
    """The per-cycle p50s of each target, and its successes and errors."""
    names = list(specs)
    p50s: dict[str, list[float | None]] = {name: [] for name in names}
    totals = {name: _Tally() for name in names}
    sessions = {
        name: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=specs[name].timeout_s),
        )
        for name in names
    }
    payloads = {name: orjson.dumps(spec.body) for name, spec in specs.items()}
    try:
        for name in names:  # unmeasured: connections open, caches and pools filled
            for _ in range(specs[name].warmup):
                await _whole(sessions[name], specs[name], payloads[name], _Tally())
        for cycle in range(cycles):
            shift = cycle % len(names)
            for name in [*names[shift:], *names[:shift]]:
                tally = _Tally()
                for _ in range(block):
                    await _whole(sessions[name], specs[name], payloads[name], tally)
                p50s[name].append(percentile(sorted(tally.latencies_ms), 50))
                total = totals[name]
                total.ok += tally.ok
                total.errors.update(tally.errors)
    finally:
        for session in sessions.values():
            await session.close()
    return {
        "p50_ms": p50s,
        "ok": {name: t.ok for name, t in totals.items()},
        "errors": {name: dict(t.errors) for name, t in totals.items()},
    }


def main() -> None:
    """Read what to run from stdin and run it, on uvloop when it is installed (as
    ``bench.load``)."""
    asked = orjson.loads(sys.stdin.buffer.readline())
    specs = {name: Spec(**spec) for name, spec in asked["specs"].items()}
    work = run(specs, int(asked["cycles"]), int(asked["block"]))
    try:
        import uvloop  # optional: the standard loop works, only slower
    except ImportError:
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    _emit({"event": "result", **result})


if __name__ == "__main__":
    main()
