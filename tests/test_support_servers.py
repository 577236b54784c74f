"""Tests for tests.support.private_servers: private servers really die, hang and come back.

Fault tests build on these guarantees, so each is checked from a client's side: a killed
server refuses connections, a frozen one accepts them but answers nothing, a restarted one
answers on the same port, a Sentinel group promotes its replica - and the shared Redis and
RabbitMQ are untouched throughout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aio_pika
import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support.private_servers import (
    PrivateRabbit,
    PrivateRabbitCluster,
    PrivateRedis,
    RedisSentinelGroup,
    command,
    descendants,
    port_refuses,
    process_alive,
    process_name,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SHARED_REDIS_PORT = 6379
SHARED_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# A frozen server must make a client give up within its own timeout plus scheduling slack.
CLIENT_TIMEOUT_S = 0.5
GIVE_UP_BOUND_S = 2.0


async def assert_shared_servers_alive() -> None:
    """The shared Redis and RabbitMQ still answer: no test here may touch them."""
    assert await command(SHARED_REDIS_PORT, "PING") == "PONG"
    connection = await aio_pika.connect(SHARED_AMQP_URL, timeout=5)
    await connection.close()


async def test_redis_kill_refuses_and_restart_answers_on_same_port(
    private_redis: PrivateRedis,
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=2)
    try:
        assert await client.ping() is True
        await client.set("k", "v")

        await private_redis.kill()
        assert not private_redis.running
        assert await port_refuses(private_redis.port)
        with pytest.raises(RedisConnectionError):
            await client.ping()

        port = private_redis.port
        seconds = await private_redis.restart()
        assert private_redis.port == port
        assert seconds < 5
        assert await client.ping() is True
        # `save ""` and no AOF: nothing survives a kill.
        assert await client.get("k") is None
    finally:
        await client.aclose()
    await assert_shared_servers_alive()


async def test_redis_freeze_times_out_and_thaw_answers(private_redis: PrivateRedis) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=CLIENT_TIMEOUT_S)
    try:
        assert await client.ping() is True

        private_redis.freeze()
        assert private_redis.running
        assert private_redis.frozen
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        assert CLIENT_TIMEOUT_S <= time.monotonic() - started < GIVE_UP_BOUND_S
        # Frozen is not dead: the kernel still accepts connections on its behalf.
        assert not await port_refuses(private_redis.port)

        private_redis.thaw()
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_sentinel_failover_promotes_the_replica(
    private_sentinels: RedisSentinelGroup,
) -> None:
    group = private_sentinels
    assert await group.master_address() == ("127.0.0.1", group.master.port)
    sentinel = Sentinel(group.sentinel_addresses, socket_timeout=1)  # type: ignore[no-untyped-call]
    master = sentinel.master_for(group.master_name, socket_timeout=1)
    try:
        await master.set("before", "1")
        # The write reached the replica before the master dies (WAIT: replicas that acked).
        assert await master.execute_command("WAIT", 1, 2000) == 1

        seconds = await group.kill_master_and_await_promotion(timeout=20)

        # down-after-milliseconds is 1000: detection plus election take a few seconds.
        assert seconds < 10
        assert await group.master_address() == ("127.0.0.1", group.replica.port)
        assert (await group.current_master()) is group.replica
        assert await port_refuses(group.master.port)
        # A Sentinel-aware client follows without being rebuilt, and keeps the data.
        assert await master.get("before") == b"1"
        await master.set("after", "1")
        assert await group.replica.command("GET", "after") == "1"
    finally:
        await master.aclose()
        for client in sentinel.sentinels:
            await client.aclose()


async def amqp_connect(url: str) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(url, timeout=5)


async def test_rabbit_kill_refuses_and_restart_keeps_durable_queue(
    private_rabbit: PrivateRabbit,
) -> None:
    node = private_rabbit
    beam = node.pid
    assert beam is not None
    assert process_name(beam) == "beam.smp"
    connection = await amqp_connect(node.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("support-durable", durable=True)
        await queue.purge()
        await channel.default_exchange.publish(
            aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        # The message is on disk (confirmed), but the queue's declaration may still sit
        # in Mnesia's log buffer, which a kill loses: once in a full suite on 2 busy
        # cores the restarted node recovered 0 queues. A checkpoint writes it out.
        await node.ctl("eval", "mnesia:dump_log().")

        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        await node.kill()
        assert not node.running
        # The client sees the crash at once (RST), not after a heartbeat timeout.
        await asyncio.wait_for(lost.wait(), 5)
    assert await port_refuses(node.port)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await amqp_connect(node.url)
    await assert_shared_servers_alive()

    port = node.port
    seconds = await node.restart()
    assert node.port == port
    assert seconds < 60
    connection = await amqp_connect(node.url)
    async with connection:
        queue = await _recovered_queue(connection, "support-durable", within_s=10)
        message = await queue.get(timeout=5)
        assert message.body == b"kept"
        await message.ack()
        await queue.delete()


async def _recovered_queue(
    connection: aio_pika.abc.AbstractRobustConnection | aio_pika.abc.AbstractConnection,
    name: str,
    within_s: float,
) -> aio_pika.abc.AbstractQueue:
    """The durable queue ``name`` once the restarted node lists it again.

    A node may take connections a moment before it has recovered its durable
    queues (seen once in CI: NOT_FOUND just after a restart). A passive
    declare that finds nothing closes its channel: each try has its own.
    """
    async with asyncio.timeout(within_s):
        while True:
            channel = await connection.channel()
            try:
                return await channel.declare_queue(name, durable=True, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                await asyncio.sleep(0.2)  # the node's recovery has no event to wait on


async def test_rabbit_freeze_times_out_and_thaw_answers(private_rabbit: PrivateRabbit) -> None:
    node = private_rabbit
    node.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await aio_pika.connect(node.url, timeout=CLIENT_TIMEOUT_S)
        assert time.monotonic() - started < GIVE_UP_BOUND_S
        assert not await port_refuses(node.port)
    finally:
        node.thaw()
    connection = await amqp_connect(node.url)
    await connection.close()


async def test_rabbit_cluster_serves_from_the_survivor(
    private_rabbit_cluster: PrivateRabbitCluster,
) -> None:
    cluster = private_rabbit_cluster
    first, second = cluster.nodes
    assert await cluster.running_nodes() == sorted([first.nodename, second.nodename])
    connection = await amqp_connect(first.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("support-cluster", durable=True)

    await first.kill()
    assert await port_refuses(first.port)
    assert await cluster.running_nodes(via=second) == [second.nodename]
    # Metadata is cluster-wide: the exchange declared on the dead node is on the survivor.
    connection = await amqp_connect(second.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("support-cluster", durable=True, passive=True)
        await exchange.delete()
    await assert_shared_servers_alive()


async def test_rabbit_pair_starts_together_and_nodes_fail_alone(
    private_rabbit_pair: tuple[PrivateRabbit, PrivateRabbit],
) -> None:
    first, second = private_rabbit_pair
    assert first.port != second.port
    assert first.nodename != second.nodename
    await first.kill()
    assert await port_refuses(first.port)
    # Independent nodes: the other one neither dies nor notices.
    connection = await amqp_connect(second.url)
    await connection.close()


# A pytest that is itself SIGKILLed (a harness timeout) runs no finalizer and no atexit hook.
_ORPHAN_SCRIPT = """
import asyncio, sys, tempfile
from pathlib import Path
from tests.support import private_servers

server = getattr(private_servers, sys.argv[1])(Path(tempfile.mkdtemp()))
asyncio.run(server.start())
print(server.pid, server.port, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("kind", "command_name"), [("PrivateRedis", "redis-server"), ("PrivateRabbit", "beam.smp")]
)
async def test_server_dies_with_a_killed_pytest(kind: str, command_name: str) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ORPHAN_SCRIPT,
        kind,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert parent.stdout is not None
        assert parent.stderr is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 60)
        assert line, (await parent.stderr.read()).decode()
        pid, port = (int(field) for field in line.split())
        assert process_name(pid) == command_name
        assert not await port_refuses(port)
        children = [child for child, _ in descendants(pid)]
    finally:
        parent.kill()
        await parent.wait()
    async with asyncio.timeout(5):
        # PR_SET_PDEATHSIG delivers SIGKILL as the parent dies; nothing announces it.
        while not await port_refuses(port) or any(map(process_alive, [pid, *children])):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
