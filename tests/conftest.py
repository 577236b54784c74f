"""Fixtures: a namespace per test on the real Redis and RabbitMQ, a fake model server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from redis.asyncio import Redis

from shared.amqp import delete_namespace
from shared.registry import Registry
from shared.settings import CommonSettings
from tests.support.fake_openai import FakeOpenAI
from tests.support.stack import (
    AMQP_URL,
    CLEANUP_LIMIT_S,
    REDIS_URL,
    Process,
    ProcessFactory,
    Stack,
    kill_all,
    process_env,
    process_id,
    within,
)

# Private Redis / Sentinel / RabbitMQ servers that tests kill and freeze.
pytest_plugins = ["tests.support.server_fixtures"]


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A namespace no other test uses."""
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
async def redis(namespace: str) -> AsyncIterator[Redis]:
    """A Redis client; the namespace's keys are deleted afterwards."""
    client = Redis.from_url(REDIS_URL)
    yield client
    async for key in client.scan_iter(
        match=CommonSettings(namespace=namespace).names.all_redis_keys, count=500
    ):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def amqp_cleanup(namespace: str, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Deletes the namespace's queues and exchanges after the test."""
    yield

    async def clean() -> None:
        connection = await aio_pika.connect(
            AMQP_URL, client_properties={"connection_name": f"cleanup-{request.node.name}"[:200]}
        )
        async with connection:
            channel = await connection.channel()
            await delete_namespace(channel, CommonSettings(namespace=namespace))

    await within(CLEANUP_LIMIT_S, "deleting the test's queues", clean())


@pytest.fixture
def registry(redis: Redis, namespace: str) -> Registry:
    """Bots and keys of the test's namespace."""
    return Registry(redis, CommonSettings(namespace=namespace).names)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible model server on loopback."""
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def bare_stack(
    namespace: str,
    registry: Registry,
    http: aiohttp.ClientSession,
    upstream: FakeOpenAI,
    amqp_cleanup: None,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    """A namespace with nothing started yet: tests add gateways and workers."""
    stack = Stack(
        namespace=namespace,
        registry=registry,
        http=http,
        upstream=upstream,
        test_name=request.node.name,
    )
    try:
        yield stack
    finally:
        await stack.close()


@pytest.fixture
async def stack(bare_stack: Stack) -> Stack:
    """One in-process gateway and one in-process worker."""
    await bare_stack.add_worker()
    await bare_stack.add_gateway()
    return bare_stack


@pytest.fixture
async def processes(
    namespace: str,
    upstream: FakeOpenAI,
    tmp_path: Path,
    amqp_cleanup: None,
    redis: Redis,
    request: pytest.FixtureRequest,
) -> AsyncIterator[ProcessFactory]:
    """Starts real ``botline`` processes (``await processes("worker")``); all killed after,
    before the namespace's keys are deleted (``redis``: a worker's heartbeat writes some)."""
    started: list[Process] = []

    async def start(command: str, *args: str, **env: str) -> Process:
        log_path = tmp_path / f"{command}-{len(started)}.log"
        if command in ("gateway", "worker"):
            # Named after the test, so that a leftover queue says which test left it.
            name = process_id(request.node.name, f"p{len(started)}")
            env = {f"BOTLINE_{command.upper()}_ID": name} | env
        process = Process(
            [command, *args], process_env(namespace, upstream.base_url, **env), log_path
        )
        started.append(process)
        await process.start()
        await process.wait_for("gateway.listening" if command == "gateway" else "worker.started")
        return process

    try:
        yield start
    finally:
        kill_all(started)
        for process in started:
            await process.stop()
