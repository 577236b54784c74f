"""``python -m bench.costs``: CPU per request of the pieces the sizing table multiplies.

Two measurements the end-to-end benchmark cannot isolate:

- the metrics' own cost: the calls one request makes into
  :mod:`services.gateway.metrics` and :mod:`services.worker.metrics`, timed
  in a loop (process CPU time);
- Redis server CPU per operation: a key lookup (a cache miss), the limiter's
  admission and settlement, a usage flush -- run against a private
  ``redis-server`` started for the purpose (never the shared one) and read
  from its ``INFO cpu``.

docs/operations.md ("Sizing") quotes its output.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.limits import Limiter
from services.gateway.metrics import HIT, GatewayMetrics
from services.gateway.usage import UsageBook
from services.worker.metrics import WorkerMetrics
from shared import keys
from shared.names import Names
from shared.records import Limits
from shared.registry import Registry
from shared.wire import Usage

CALLS = 200_000
OPS = 20_000
IN_FLIGHT = 32


def metrics_costs() -> dict[str, float]:
    """Microseconds of CPU per request spent in the metrics calls of each service."""
    gateway = GatewayMetrics()
    worker = WorkerMetrics(["echo", "fake"])
    usage = Usage(prompt_tokens=10, completion_tokens=32)

    def whole() -> None:
        gateway.key_lookup(HIT)
        gateway.jobs_in_flight.inc()
        gateway.queue_wait.observe(0.001)
        gateway.jobs_in_flight.dec()
        gateway.request("seed", 200, None, False, 0.003, "bot")

    def stream() -> None:
        whole()
        gateway.streams_open.inc()
        gateway.first_token("openai", 0.01, "bot")
        gateway.streams_open.dec()

    def job() -> None:
        series = worker.of("fake")
        series.in_flight.inc()
        series.duration.observe(0.002)
        series.job("done")
        series.used(usage)
        series.in_flight.dec()

    costs = {}
    for name, call in (("gateway, whole", whole), ("gateway, stream", stream), ("worker", job)):
        started = time.process_time()
        for _ in range(CALLS):
            call()
        costs[name] = (time.process_time() - started) / CALLS * 1e6
    return costs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _server_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _per_op(redis: Redis, op: Callable[[int], Awaitable[object]]) -> float:
    """Server CPU microseconds per ``op``, with IN_FLIGHT calls at a time."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            await op(i)

    before = await _server_cpu(redis)
    await asyncio.gather(*(one(i) for i in range(OPS)))
    return (await _server_cpu(redis) - before) / OPS * 1e6


async def redis_costs(url: str) -> dict[str, float]:
    """Redis server CPU microseconds per operation of a request."""
    redis = Redis.from_url(url)
    names = Names("costs")
    registry = Registry(redis, names)
    bot = await registry.create_bot(name="b", endpoint="echo", model="m")
    key, record = await registry.create_key(bot.id, "k")
    key_hash = keys.hash_key(key)
    limiter = Limiter(redis, names, timeout_s=5, lease_ttl_s=30)
    book = UsageBook(registry, timeout_s=5)
    limits = Limits(rpm=10**9, tpm=10**9, concurrency=10**6)

    async def admit_and_settle(i: int) -> None:
        grant = await limiter.admit(record.key_id, limits, f"lease-{i}")
        limiter.settle(grant, 40)

    async def flush(i: int) -> None:
        book.record(record.key_id, bot.id, Usage(prompt_tokens=10, completion_tokens=30))
        await book.flush()

    try:
        return {
            "key lookup (cache miss)": await _per_op(redis, lambda i: registry.lookup(key_hash)),
            "admit + settle (rpm, tpm, concurrency)": await _per_op(redis, admit_and_settle),
            "usage flush, one key": await _per_op(redis, flush),
        }
    finally:
        await limiter.close()
        await redis.aclose()


def main() -> None:
    """Print both tables."""
    for name, micros in metrics_costs().items():
        print(f"metrics, {name}: {micros:.1f} µs CPU per request")
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server not found: Redis costs not measured")
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", data],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"

            async def measure() -> dict[str, float]:
                async with asyncio.timeout(10):
                    while True:
                        try:
                            async with Redis.from_url(url) as probe:
                                await probe.ping()
                            break
                        except (OSError, RedisError):
                            await asyncio.sleep(0.05)
                return await redis_costs(url)

            for name, micros in asyncio.run(measure()).items():
                print(f"redis server, {name}: {micros:.1f} µs CPU per request")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
