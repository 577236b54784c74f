"""High availability (issue 12.5): a Redis master lost under Sentinel, a broker node lost.

Private servers only (tests/support/private_servers.py): a Sentinel group per test, two
independent RabbitMQ nodes per module. Nothing is restarted but the servers killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aio_pika
import pytest

from shared.redis_client import redis_client
from shared.registry import Registry
from shared.settings import CommonSettings
from tests.support.client import chat, until_status
from tests.support.private_servers import PrivateRabbit, RedisSentinelGroup
from tests.support.stack import Stack, process_env

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ASK = {"messages": [{"role": "user", "content": "still there?"}]}


@pytest.fixture
def sentinel_settings(private_sentinels: RedisSentinelGroup) -> dict[str, object]:
    """Settings that reach the private group's master through its three Sentinels."""
    return {
        "redis_url": "redis://unused/0",  # the address comes from the Sentinels
        "redis_sentinels": ",".join(f"{h}:{p}" for h, p in private_sentinels.sentinel_addresses),
        "redis_sentinel_master": private_sentinels.master_name,
    }


async def test_redis_master_lost_fails_closed_then_serves_after_promotion(
    bare_stack: Stack,
    private_sentinels: RedisSentinelGroup,
    sentinel_settings: dict[str, object],
    namespace: str,
) -> None:
    settings = CommonSettings(namespace=namespace, **sentinel_settings)  # type: ignore[arg-type]
    redis = redis_client(settings, timeout_s=1.0)
    registry = Registry(redis, settings.names)
    try:
        bot = await registry.create_bot(name="ha", endpoint="echo", model="m")
        key, record = await registry.create_key(bot.id, "ha")
        await bare_stack.add_worker()
        await bare_stack.add_gateway(**sentinel_settings, redis_timeout_s=0.5)
        http, url = bare_stack.http, bare_stack.url
        assert (await chat(http, url, key, ASK))[0] == 200  # cached from here on

        # Callers keep asking all through the failover.
        seen: list[tuple[float, float, int, str]] = []
        stop = asyncio.Event()

        async def ask_all_along() -> None:
            while not stop.is_set():
                started = time.monotonic()
                status, body, _ = await chat(http, url, key, ASK)
                code = body["error"]["code"] if status != 200 else ""
                seen.append((started, time.monotonic(), status, code))
                await asyncio.sleep(0.02)

        asker = asyncio.create_task(ask_all_along())
        try:
            killed = time.monotonic()
            failover_s = await private_sentinels.kill_master_and_await_promotion(timeout=30)
            promoted = time.monotonic()
            recovered_s = await until_status(http, url, key, 200, timeout=10)
        finally:
            stop.set()
            await asyncio.gather(asker, return_exceptions=True)

        statuses = {status for _, _, status, _ in seen}
        assert 401 not in statuses, seen  # never "invalid key" for a backend outage
        # Once the gateway had a moment to see the master gone (its subscription drops at
        # once), every answer until the promotion is a 503: nothing served unchecked.
        # The outage ends when the first Sentinel names the new master: a client may
        # be told from then on (the group's own check that all agree comes later).
        switched = killed + (private_sentinels.last_switch_seen_s or failover_s)
        # (A second's grace: on a loaded machine the gateway's loop may take that long
        # to run the subscription's reset.)
        # The switch is seen by polling the Sentinels, which may lag the gateway's own
        # question to them by a poll under load: half a second's margin there too.
        during = [
            (s, c) for start, end, s, c in seen if start > killed + 1.0 and end < switched - 0.5
        ]
        assert during, "no request fell inside the outage"
        assert set(during) == {(503, "backend_unavailable")}, during
        assert recovered_s < 10, recovered_s
        served = [end for start, end, status, _ in seen if status == 200 and start > switched]
        first_200_s = (min(served) if served else promoted + recovered_s) - switched

        # The key cache's invalidation subscription followed the master: a revocation
        # made on the new master reaches the gateway.
        async with asyncio.timeout(10):
            while True:  # polling: readiness is a probe
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
        await registry.revoke(record.key_id)
        # Within the contract's second: the invalidation travels by pub/sub.
        assert await until_status(http, url, key, 401, timeout=1.0) < 1.0
        print(
            f"\nSentinel failover {failover_s:.1f} s after kill -9; "
            f"{len(during)} requests during the outage all 503; "
            f"first 200 {first_200_s:.2f} s after a Sentinel named the new master, "
            f"{recovered_s:.2f} s after all agreed"
        )
    finally:
        await redis.aclose()


async def test_broker_node_lost_gateway_and_worker_follow_to_the_next_url(
    bare_stack: Stack, private_rabbit_pair: tuple[PrivateRabbit, PrivateRabbit], namespace: str
) -> None:
    first, second = private_rabbit_pair
    broker = {"amqp_url": f"{first.url},{second.url}"}
    await bare_stack.add_worker(**broker)  # both start on the first URL
    await bare_stack.add_gateway(**broker)
    http, url = bare_stack.http, bare_stack.url
    _, key = await bare_stack.bot_and_key()
    assert (await chat(http, url, key, ASK))[0] == 200

    killed = time.monotonic()
    await first.kill()
    recovered_s = await until_status(http, url, key, 200, timeout=10)
    total_s = time.monotonic() - killed
    assert recovered_s < 10, recovered_s

    # Answered on the second node: the topology was declared there, the worker consumes.
    names = CommonSettings(namespace=namespace).names
    connection = await aio_pika.connect(second.url)
    async with connection:
        channel = await connection.channel()
        jobs = await channel.declare_queue(names.jobs_queue, passive=True)
        assert jobs.declaration_result.consumer_count == 1
    print(f"\nbroker node kill -9: requests answered again {total_s:.2f} s after, on the next URL")


async def test_the_botline_command_reaches_redis_through_sentinel(
    private_sentinels: RedisSentinelGroup, sentinel_settings: dict[str, object], namespace: str
) -> None:
    env = process_env(
        namespace,
        None,
        BOTLINE_REDIS_URL="redis://unused/0",
        BOTLINE_REDIS_SENTINELS=str(sentinel_settings["redis_sentinels"]),
        BOTLINE_REDIS_SENTINEL_MASTER=private_sentinels.master_name,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "bots",
        "create",
        "--name",
        "via-sentinel",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    # Written to the group's master, not to the shared Redis.
    master = await private_sentinels.current_master()
    settings = CommonSettings(namespace=namespace)
    bots = await master.command("SMEMBERS", settings.names.bots)
    assert len(bots) == 1, (bots, out.decode())
