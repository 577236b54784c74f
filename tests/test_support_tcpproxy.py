"""Tests for tests.support.tcpproxy against the shared Redis (PING only, no keys written)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.tcpproxy import TcpProxy

REDIS = ("127.0.0.1", 6379)
PING, PONG = b"PING\r\n", b"+PONG\r\n"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[int], Awaitable[Stream]]


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A started proxy in front of the shared Redis, closed after the test."""
    async with TcpProxy(*REDIS) as p:
        yield p


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw connections to a port and close them all at teardown."""
    writers: list[asyncio.StreamWriter] = []

    async def _connect(port: int) -> Stream:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writers.append(writer)
        return reader, writer

    yield _connect
    for writer in writers:
        writer.close()
        # A socket the proxy reset reports that again here; the test already checked it.
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def ping(stream: Stream, within: float = 5.0) -> bytes:
    """Send PING and return the reply line."""
    reader, writer = stream
    writer.write(PING)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), within)


@pytest.mark.integration
async def test_forwards_and_counts_connections(proxy: TcpProxy, connect: Connect) -> None:
    stream = await connect(proxy.port)
    await proxy.wait_connections(1, timeout=5)
    assert await ping(stream) == PONG
    assert await ping(stream) == PONG
    assert (proxy.connections, proxy.accepted) == (1, 1)

    stream[1].close()
    await proxy.wait_idle(timeout=5)
    assert proxy.connections == 0


@pytest.mark.integration
async def test_half_close_is_forwarded(proxy: TcpProxy, connect: Connect) -> None:
    reader, writer = await connect(proxy.port)
    writer.write(PING)
    writer.write_eof()
    # Redis answers, then closes once it saw our EOF; the proxy passes both back.
    assert await asyncio.wait_for(reader.read(), 5) == PONG
    await proxy.wait_idle(timeout=5)


@pytest.mark.integration
async def test_down_resets_and_refuses_then_up_on_same_port(
    proxy: TcpProxy, connect: Connect
) -> None:
    port = proxy.port
    reader, _ = stream = await connect(port)
    assert await ping(stream) == PONG

    await proxy.down()
    assert not proxy.listening
    assert proxy.connections == 0
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    with pytest.raises(ConnectionRefusedError):
        await connect(port)

    await proxy.up()
    assert proxy.port == port
    assert await ping(await connect(port)) == PONG
    assert proxy.accepted == 2


@pytest.mark.integration
async def test_freeze_buffers_until_thaw(proxy: TcpProxy, connect: Connect) -> None:
    old = await connect(proxy.port)
    assert await ping(old) == PONG

    proxy.freeze()
    with pytest.raises(TimeoutError):
        await ping(old, within=0.3)
    # New connections are still accepted while frozen; their bytes wait too.
    new = await connect(proxy.port)
    await proxy.wait_connections(2, timeout=5)
    new[1].write(PING)

    proxy.thaw()
    assert not proxy.frozen
    assert await asyncio.wait_for(old[0].readline(), 5) == PONG
    assert await asyncio.wait_for(new[0].readline(), 5) == PONG
    assert await ping(old) == PONG


@pytest.mark.integration
async def test_close_with_frozen_connections(connect: Connect) -> None:
    proxy = TcpProxy(*REDIS)
    await proxy.start()
    reader, writer = await connect(proxy.port)
    await proxy.wait_connections(1, timeout=5)
    proxy.freeze()
    writer.write(PING)

    await proxy.close()
    await proxy.close()  # idempotent
    assert proxy.connections == 0
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)


async def test_unreachable_target_resets_client(connect: Connect) -> None:
    # A port that was just free: nothing listens there, so the upstream connect is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with TcpProxy("127.0.0.1", dead_port) as proxy:
        reader, _ = await connect(proxy.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        await proxy.wait_idle(timeout=5)


async def test_bulk_transfer_with_backpressure(connect: Connect) -> None:
    # A local echo server: enough data to fill socket buffers and exercise pause_writing.
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    try:
        async with TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as proxy:
            reader, writer = await connect(proxy.port)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            assert await asyncio.wait_for(reader.read(), 10) == payload
            await asyncio.wait_for(sending, 5)
            await proxy.wait_idle(timeout=5)
    finally:
        server.close()
        await server.wait_closed()


async def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = TcpProxy(*REDIS).port
