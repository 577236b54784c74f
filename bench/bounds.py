"""``python -m bench.bounds``: a small request's latency while senders loop worst-case bodies.

Starts one gateway and one worker (``make run``'s defaults, the built-in echo
model) in a fresh namespace, then measures a small whole request on the seed
surface, one every 50 ms: first alone, then while ``--senders`` processes each
post 1 MiB bodies in a loop, as fast as they are answered. The bodies rotate
through what costs a gateway most before it can say no (or yes):

- ``seed-30k``: 30,000 short messages on the seed surface (the bot keeps 10);
- ``openai-30k``: the same on ``/openai/v1``;
- ``tools-objects``: an OpenAI body with ~300,000 empty objects in ``tools``;
- ``deep``: 1 MiB of nested arrays;
- ``openai-2048``: 2048 long messages (within every bound: validated, kept 10).

Prints one JSON object: the probe's p50/p90/p99 (ms) alone and under load, the
senders' answers by body and status, and the gateway's CPU seconds. Timings
move 2-3x between runs on a shared machine; compare runs made back to back.
``--python-path DIR`` runs the services from another checkout (e.g. the code
before a change) with this script.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from bench.procs import Processes, cpu_seconds, free_port, wait_http_ok
from bench.stats import percentile
from bench.targets import _delete_botline_namespace as delete_namespace
from shared.names import Names
from shared.registry import Registry
from shared.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
SMALL = {"messages": [{"role": "user", "content": "hello there"}]}


def bodies() -> dict[str, tuple[str, bytes]]:
    """Worst-case bodies by name: (path, body), each at most 1 MiB."""
    many = [{"role": "user", "content": f"m{i}"} for i in range(30_000)]
    long_text = "word " * 90
    fit = [{"role": "user", "content": long_text} for _ in range(2048)]
    empties = b"{}," * ((MIB - 200) // 3 - 1) + b"{}"
    user = b'{"role": "user", "content": "hi"}'
    depth = MIB // 2 - 40
    found = {
        "seed-30k": ("/v1/chat/completions", orjson.dumps({"messages": many})),
        "openai-30k": ("/openai/v1/chat/completions", orjson.dumps({"messages": many})),
        "tools-objects": (
            "/openai/v1/chat/completions",
            b'{"messages": [' + user + b'], "tools": [' + empties + b"]}",
        ),
        "deep": (
            "/v1/chat/completions",
            b'{"messages": [' + user + b'], "model": ' + b"[" * depth + b"]" * depth + b"}",
        ),
        "openai-2048": ("/openai/v1/chat/completions", orjson.dumps({"messages": fit})),
    }
    for name, (_, body) in found.items():
        assert len(body) <= MIB, (name, len(body))
    return found


async def sender(url: str, key: str, seconds: float, only: list[str]) -> None:
    """Post the worst-case bodies in turn until ``seconds`` pass; print the tally."""
    tally: collections.Counter[str] = collections.Counter()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    work = [(name, body) for name, body in bodies().items() if not only or name in only]
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        i = 0
        while time.monotonic() < deadline:
            name, (path, body) = work[i % len(work)]
            i += 1
            async with session.post(url + path, data=body, headers=headers) as resp:
                await resp.read()
                tally[f"{name} {resp.status}"] += 1
    print(json.dumps(dict(tally)), flush=True)


async def probe(session: aiohttp.ClientSession, url: str, key: str, seconds: float) -> list[float]:
    """A small request's latencies (ms), one sent every 50 ms for ``seconds``.

    Sent on a schedule, not one after the other: a stalled gateway then delays
    every request due during the stall, as it would real callers', instead of
    one probe that happens to wait (no coordinated omission).
    """
    headers = {"Authorization": f"Bearer {key}"}

    async def one() -> float:
        started = time.perf_counter()
        async with session.post(f"{url}/v1/chat/completions", json=SMALL, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"the probe got HTTP {resp.status}")
        return (time.perf_counter() - started) * 1000

    async with asyncio.TaskGroup() as group:
        sent = [group.create_task(one())]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            sent.append(group.create_task(one()))
    return [task.result() for task in sent]


def figures(latencies: list[float]) -> dict[str, Any]:
    """p50, p90, p99 and the count."""
    return {
        "n": len(latencies),
        **{f"p{q}": round(percentile(latencies, q) or 0, 1) for q in (50, 90, 99)},
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the services, measure alone then under load, stop everything."""
    namespace = f"benchbounds{secrets.token_hex(3)}"
    source: Path = args.python_path
    keep = {"BOTLINE_REDIS_URL", "BOTLINE_AMQP_URL"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTLINE_") or k in keep}
    env.update(BOTLINE_NAMESPACE=namespace, BOTLINE_LOG_LEVEL="warning", PYTHONPATH=str(source))
    settings = CommonSettings(namespace=namespace)
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    registry = Registry(redis, Names(namespace))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    services = [sys.executable, "-m", "services.cli"]
    logs = ROOT / "bench" / "results" / "logs" / "bounds"
    try:
        bot = await registry.create_bot(name="bench-bounds", endpoint="echo", model="echo")
        key, _ = await registry.create_key(bot.id, "bench")
        async with Processes(logs) as procs:
            worker = await procs.start("worker", [*services, "worker"], env=env, cwd=source)
            gateway = await procs.start(
                "gateway", [*services, "gateway", "--port", str(port)], env=env, cwd=source
            )
            await wait_http_ok(f"{url}/readyz", [worker, gateway])
            async with aiohttp.ClientSession() as session:
                await probe(session, url, key, 1.0)  # warm up
                alone = await probe(session, url, key, args.seconds)
                cpu_before = cpu_seconds([gateway.pid])
                argv = [sys.executable, "-m", "bench.bounds", "--sender", url, key,
                        "--seconds", str(args.seconds + 1), "--bodies", args.bodies]  # fmt: skip
                senders = [
                    await procs.start(f"sender{i}", argv, cwd=ROOT, stdout_pipe=True)
                    for i in range(args.senders)
                ]
                await asyncio.sleep(1.0)  # let every sender be mid-body
                loaded = await probe(session, url, key, args.seconds)
                tallies: collections.Counter[str] = collections.Counter()
                for proc in senders:
                    assert proc.process.stdout is not None
                    line = await asyncio.wait_for(proc.process.stdout.readline(), 120)
                    tallies.update(json.loads(line))
                    await proc.process.wait()
                gateway_cpu = cpu_seconds([gateway.pid]) - cpu_before
    finally:
        try:
            await delete_namespace(redis, settings)
        finally:
            await redis.aclose()
    return {
        "source": str(source),
        "senders": args.senders,
        "bodies": args.bodies or "all",
        "seconds": args.seconds,
        "probe_alone_ms": figures(alone),
        "probe_under_load_ms": figures(loaded),
        "sender_answers": dict(sorted(tallies.items())),
        "gateway_cpu_s_under_load": round(gateway_cpu, 2),
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--python-path", help="run the services from this checkout")
    parser.add_argument("--bodies", default="", help="comma-separated body names (default all)")
    parser.add_argument("--sender", nargs=2, metavar=("URL", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.python_path = Path(args.python_path).resolve() if args.python_path else ROOT
    if args.sender:
        only = [name for name in args.bodies.split(",") if name]
        asyncio.run(sender(args.sender[0], args.sender[1], args.seconds, only))
        return
    print(json.dumps(asyncio.run(measure(args)), indent=2))


if __name__ == "__main__":
    main()
