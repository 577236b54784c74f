"""The load generator, run as ``python -m bench.load`` in a process of its own.

It gets one :class:`Spec` as a JSON line on stdin and talks back in JSON lines on stdout:

1. ``{"event": "warmed"}`` once the unmeasured warm-up requests are done; it then waits
   for a ``go`` line on stdin, so that the parent can read the servers' CPU and memory
   at rest before the measured phase starts, not a few milliseconds into it;
2. ``{"event": "all_open", ...}`` (streams only) the first time every one of
   ``concurrency`` streams has its response headers and has not finished, which is when
   the parent reads the servers' memory "with all streams open";
3. ``{"event": "done"}`` when the last measured request has finished (the parent reads
   CPU time again), then ``{"event": "result", ...}`` with the figures.

A process of its own, so that the client's event loop shares nothing with what it measures
(the fake upstream and the systems under test run in other processes too). One
``ClientSession`` whose connector allows exactly ``concurrency`` connections. Every loop is
bounded by a request count and a deadline, and every request by a timeout.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.stats import summary


@dataclass(frozen=True)
class Spec:
    """One measured run against one target."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    stream: bool
    concurrency: int
    requests: int  # measured requests, at most
    duration_s: float  # no new measured request is started after this
    warmup: int  # unmeasured requests first, at the same concurrency
    expect_tokens: int  # "tok" words each answer must hold (0: do not check)
    timeout_s: float  # one request, at most
    stagger_s: float = 0.0  # measured phase: each caller first waits a random part of this

    def dumps(self) -> bytes:
        """The spec as one JSON line."""
        return orjson.dumps(asdict(self)) + b"\n"

    @classmethod
    def loads(cls, line: bytes) -> Spec:
        """The spec from :meth:`dumps`'s line."""
        return cls(**orjson.loads(line))


@dataclass
class _Tally:
    """What one phase (warm-up or measured) saw."""

    latencies_ms: list[float] = field(default_factory=list)  # whole answers: the whole call
    ttfts_ms: list[float] = field(default_factory=list)  # streams: to the first content
    gaps_ms: list[float] = field(default_factory=list)  # streams: between content chunks
    errors: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    tokens: int = 0  # "tok" words received in successful answers
    chunks: int = 0  # content-bearing SSE events received in successful streams


class _Open:
    """Counts streams in progress and says once when all ``target`` of them are."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.now = 0
        self.peak = 0
        self.reported = False
        self.armed = False  # only the measured phase reports

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        if self.armed and not self.reported and self.now >= self.target:
            self.reported = True
            _emit({"event": "all_open", "open": self.now, "t": time.monotonic()})

    def leave(self) -> None:
        self.now -= 1


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


def _error_name(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


async def _whole(session: aiohttp.ClientSession, spec: Spec, payload: bytes, tally: _Tally) -> None:
    start = time.perf_counter()
    try:
        async with session.post(spec.url, data=payload, headers=spec.headers) as resp:
            raw = await resp.read()
            status = resp.status
        elapsed_ms = (time.perf_counter() - start) * 1000
        if status != 200:
            tally.errors[f"http {status}"] += 1
            return
        content = orjson.loads(raw)["choices"][0]["message"]["content"] or ""
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        tally.errors[_error_name(exc)] += 1
        return
    except (KeyError, IndexError, TypeError):
        tally.errors["malformed answer"] += 1
        return
    words = content.count("tok")
    if spec.expect_tokens and words != spec.expect_tokens:
        tally.errors["wrong length"] += 1
        return
    tally.ok += 1
    tally.tokens += words
    tally.latencies_ms.append(elapsed_ms)


async def _stream(
    session: aiohttp.ClientSession, spec: Spec, payload: bytes, tally: _Tally, opened: _Open
) -> None:
    start = time.perf_counter()
    first: float | None = None
    last = 0.0
    gaps: list[float] = []
    words = chunks = 0
    finished = False
    try:
        async with session.post(spec.url, data=payload, headers=spec.headers) as resp:
            if resp.status != 200:
                await resp.read()
                tally.errors[f"http {resp.status}"] += 1
                return
            opened.enter()
            try:
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    event = orjson.loads(data)
                    if event.get("error"):
                        tally.errors["error event"] += 1
                        return
                    now = time.perf_counter()
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = now
                            else:
                                gaps.append((now - last) * 1000)
                            last = now
                            chunks += 1
                            words += text.count("tok")
            finally:
                opened.leave()
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        tally.errors[_error_name(exc)] += 1
        return
    except (AttributeError, TypeError):
        tally.errors["malformed event"] += 1
        return
    if not finished or first is None:
        tally.errors["broken stream"] += 1
        return
    if spec.expect_tokens and words != spec.expect_tokens:
        tally.errors["wrong length"] += 1
        return
    tally.ok += 1
    tally.tokens += words
    tally.chunks += chunks
    tally.ttfts_ms.append((first - start) * 1000)
    tally.gaps_ms.extend(gaps)


async def _phase(
    session: aiohttp.ClientSession,
    spec: Spec,
    payload: bytes,
    count: int,
    duration_s: float,
    opened: _Open,
    stagger_s: float = 0.0,
) -> tuple[_Tally, float]:
    """``count`` requests at most, none started after ``duration_s``; returns wall time.

    With ``stagger_s`` each caller's first request waits a random part of it.
    """
    tally = _Tally()
    issued = 0
    start = time.monotonic()
    deadline = start + duration_s

    async def user(delay: float) -> None:
        nonlocal issued
        await asyncio.sleep(delay)
        while issued < count and time.monotonic() < deadline:
            issued += 1
            if spec.stream:
                await _stream(session, spec, payload, tally, opened)
            else:
                await _whole(session, spec, payload, tally)

    delays = [random.uniform(0, stagger_s) for _ in range(spec.concurrency)]
    await asyncio.gather(*(user(delay) for delay in delays))
    return tally, time.monotonic() - start


def _result(spec: Spec, tally: _Tally, wall_s: float, opened: _Open) -> dict[str, Any]:
    errors = sum(tally.errors.values())
    rounded = [round(v, 3) for v in (tally.ttfts_ms if spec.stream else tally.latencies_ms)]
    return {
        "event": "result",
        "ok": tally.ok,
        "errors": errors,
        "error_kinds": dict(tally.errors),
        "wall_s": wall_s,
        "rps": tally.ok / wall_s if wall_s > 0 else 0.0,
        "tokens": tally.tokens,
        "chunks": tally.chunks,
        "latency_ms": summary(tally.latencies_ms),
        "ttft_ms": summary(tally.ttfts_ms),
        "gap_ms": summary(tally.gaps_ms),
        # Per request, so the raw results can be re-analysed: whole-call latency for
        # whole answers, time to first token for streams.
        "raw_ms": rounded,
        "peak_open": opened.peak,
        "all_open": opened.reported,
    }


async def run(spec: Spec) -> None:
    """Warm up, wait for ``go``, measure, report (see the module docstring)."""
    payload = orjson.dumps(spec.body)
    headers = {"Content-Type": "application/json", **spec.headers}
    spec = Spec(**{**asdict(spec), "headers": headers})
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    opened = _Open(spec.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _phase(session, spec, payload, spec.warmup, spec.timeout_s, opened)
        _emit({"event": "warmed"})
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return
        opened.peak, opened.armed = 0, True
        tally, wall_s = await _phase(
            session, spec, payload, spec.requests, spec.duration_s, opened, spec.stagger_s
        )
        _emit({"event": "done"})
        _emit(_result(spec, tally, wall_s, opened))


def main() -> None:
    """Read the spec from stdin and run it, on uvloop when it is installed."""
    spec = Spec.loads(sys.stdin.buffer.readline())
    try:
        import uvloop  # optional: the standard loop works, only slower
    except ImportError:
        asyncio.run(run(spec))
    else:
        uvloop.run(run(spec))


if __name__ == "__main__":
    main()
