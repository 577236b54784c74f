"""Asyncio TCP proxy that fakes Redis/RabbitMQ outages for tests.

The shared Redis and RabbitMQ servers must never be stopped or reconfigured, so tests point
our code at a :class:`TcpProxy` in front of them and break the proxy instead:

* ``down()`` / ``up()``: unreachable (live connections reset, new connects refused), then
  reachable again on the same port;
* ``freeze()`` / ``thaw()``: sockets stay open and new ones are accepted, but no bytes move
  in either direction until thaw, when everything buffered is forwarded - a hung server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

_log = logging.getLogger(__name__)
# SO_LINGER on with a zero timeout turns close() into an RST, like a crashed or
# firewalled server, instead of the orderly FIN a plain abort() may send.
_LINGER_RST = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; all decisions are made by its _Link."""

    def __init__(self, link: _Link, is_client: bool) -> None:
        self.link = link
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()  # received here, not yet written to the other socket
        self.eof = False  # this socket half-closed or closed: pass it on after `pending`
        self.eof_sent = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.is_client:
            self.link.accepted()

    def data_received(self, data: bytes) -> None:
        self.pending += data
        self.link.flush()

    def eof_received(self) -> bool:
        self.eof = True
        self.link.flush()
        return True  # keep our sending half open: the peer may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        self.link.flush()
        self.link.maybe_done()
        if self.is_client:
            self.link.proxy._notify()  # the connection count dropped

    # Backpressure: while this socket cannot take more, stop reading from the other one.
    def pause_writing(self) -> None:
        other = self.link.other(self).transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.link.other(self).transport
        if other is not None:
            other.resume_reading()


class _Link:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.connecting: asyncio.Task[None] | None = None
        self.aborted = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def accepted(self) -> None:
        self.proxy._register(self)
        if not self.proxy.listening:
            # Accepted in the instant before down() closed the listener: unreachable too.
            self.abort()
            return
        self.connecting = self.proxy._spawn(self._connect())
        self.connecting.add_done_callback(lambda _: self.maybe_done())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: self.upstream, self.proxy.target_host, self.proxy.target_port
            )
        except OSError as exc:
            _log.debug("tcpproxy: upstream connect failed: %s", exc)
            self.abort()  # the client sees a reset, as if the server were not there
            return
        if self.aborted:
            assert self.upstream.transport is not None
            self.upstream.transport.abort()
        else:
            self.flush()

    def flush(self) -> None:
        """Forward buffered bytes and EOFs in both directions unless frozen."""
        if self.proxy.frozen or self.aborted:
            return
        for src in (self.client, self.upstream):
            dst = self.other(src).transport
            if dst is None or dst.is_closing():
                continue
            if src.pending:
                dst.write(bytes(src.pending))
                src.pending.clear()
            if src.eof and not src.eof_sent:
                src.eof_sent = True
                if src.lost:
                    dst.close()  # close() still delivers what is in the write buffer
                else:
                    dst.write_eof()
        if self.client.eof_sent and self.upstream.eof_sent:
            for side in (self.client, self.upstream):
                if side.transport is not None:
                    side.transport.close()

    def abort(self) -> None:
        """Reset both sockets and drop anything buffered."""
        self.aborted = True
        if self.connecting is not None:
            self.connecting.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                _reset(side.transport)

    def maybe_done(self) -> None:
        upstream_gone = self.upstream.lost or (
            self.upstream.transport is None and (self.connecting is None or self.connecting.done())
        )
        if self.client.lost and upstream_gone:
            self.proxy._unregister(self)


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port``, with switchable outages."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        """``host`` is where to listen; the port is picked on the first start()."""
        self.target_host = target_host
        self.target_port = target_port
        self._host = host
        self._port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._frozen = False
        self._accepted = 0
        # Replaced on every change, so waiters wake up once per change (no polling).
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        """The listening port; stays the same across down()/up()."""
        if not self._port:
            raise RuntimeError("TcpProxy is not started")
        return self._port

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        # Counted by the client socket: while frozen, the upstream half of a connection
        # whose client left stays open until thaw, but the client is gone all the same.
        return sum(not link.client.lost for link in self._links)

    @property
    def accepted(self) -> int:
        """Client connections accepted since start (tells a reconnect from an old socket)."""
        return self._accepted

    @property
    def listening(self) -> bool:
        """True between start()/up() and down()/close()."""
        return self._server is not None

    @property
    def frozen(self) -> bool:
        """True between freeze() and thaw()."""
        return self._frozen

    async def start(self) -> None:
        """Listen on ``host``, on a free port the first time, on the same port after."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _Link(self).client, self._host, self._port
            )
            self._port = self._server.sockets[0].getsockname()[1]

    async def up(self) -> None:
        """Listen again on the same port after down()."""
        await self.start()

    async def down(self) -> None:
        """Refuse new connects and reset every live connection on both sides."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort()
        if server is not None:
            # After the aborts: on Python 3.12+ this waits for accepted sockets to close.
            await server.wait_closed()
        await self._wait_for(lambda: not self._links, 5.0)

    def freeze(self) -> None:
        """Stop forwarding bytes both ways; connections stay open and are still accepted."""
        self._frozen = True

    def thaw(self) -> None:
        """Forward everything buffered while frozen and resume normal forwarding."""
        self._frozen = False
        for link in list(self._links):
            link.flush()

    async def wait_connections(self, at_least: int = 1, timeout: float = 10.0) -> None:  # noqa: ASYNC109 -- test-facing API
        """Wait until at least ``at_least`` client connections are open."""
        await self._wait_for(lambda: self.connections >= at_least, timeout)

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 -- test-facing API
        """Wait until no client connection is open."""
        await self._wait_for(lambda: self.connections == 0, timeout)

    async def close(self) -> None:
        """Stop listening, reset all connections and finish every task. Idempotent."""
        await self.down()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _register(self, link: _Link) -> None:
        self._links.add(link)
        self._accepted += 1
        self._notify()

    def _unregister(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self._notify()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Retrieving the exception here is what prevents "Task exception was never retrieved".
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("tcpproxy: task failed", exc_info=exc)
