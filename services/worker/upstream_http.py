"""The worker's HTTP/1.1 client for model endpoints: one POST, its answer read whole or as it comes.

Why not aiohttp's client: measured on this machine at 64 calls in flight, a
whole answer through ``OpenAIModel`` cost 166-217 µs of CPU on
``aiohttp.ClientSession`` and 94-105 µs on this client; the difference is
about a fifth of the worker's CPU per whole answer (docs/performance.md,
eighth pass). A model call needs little of what a
general client carries: one method, one URL per endpoint, no cookies (a
cookie kept from one caller's call would go out with the next caller's), no
redirects, no proxies, no compression (it asks for ``identity``).

What it does: a keep-alive pool per endpoint (at most ``limit`` calls at once;
more wait for one to end), ``http`` and ``https`` (the system's trust store,
which ``SSL_CERT_FILE`` overrides), bodies framed by ``Content-Length``,
``chunked`` or the connection's end, a connect timeout, a silence timeout
(seconds without a byte while waiting for one), and pausing the socket
between a paced stream's reads. A connection is reused only after its
answer was read to the end.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping
from typing import cast

import yarl
from multidict import CIMultiDict

# A response head larger than this is refused (aiohttp's limit is 8 KiB a line).
MAX_HEAD_BYTES = 64 * 1024
# A whole answer larger than this is refused rather than held in memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Above this many unread bytes the socket is paused until they are read.
_HIGH_WATER = 256 * 1024
# An idle connection older than this is closed rather than reused (servers drop
# theirs after 5-75 s; aiohttp's default is 15 s).
KEEPALIVE_S = 15.0
# How long a name's addresses are reused for new connections (aiohttp's default
# too): a burst of new connections must not be a burst of lookups.
DNS_TTL_S = 10.0
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class ConnectionFailed(Exception):
    """The endpoint could not be reached, or dropped or garbled the answer.

    ``str()`` is a short reason in our words: it reaches logs and, through
    :class:`shared.errors.UpstreamError`, callers.
    """


class _Connection(asyncio.Protocol):
    """One socket to the endpoint: what arrived, and a future for whoever waits on more."""

    __slots__ = ("_paused", "_waiter", "buffer", "closed", "heard", "idle_since", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.heard = False  # anything received since the last request was sent
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def more(self, timeout_s: float) -> bool:
        """Wait for bytes beyond those buffered; False if the connection ended instead."""
        if self.closed:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._timed_out)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return not self.closed or bool(self.buffer)

    def take(self, n: int | None = None) -> bytes:
        """Up to ``n`` (default: all) buffered bytes, removed from the buffer."""
        buffer = self.buffer
        if n is None or n >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        return data

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """One answer: its status and head, then its body, whole or as it arrives."""

    __slots__ = (
        "_chunk_left",
        "_chunked",
        "_conn",
        "_done",
        "_head",
        "_keep_alive",
        "_length",
        "_pool",
        "_released",
        "_timeout_s",
        "status",
    )

    def __init__(
        self, pool: HTTPPool, conn: _Connection, status: int, head: list[bytes], timeout_s: float
    ) -> None:
        self.status = status
        self._head = head
        self._conn = conn
        self._pool = pool
        self._timeout_s = timeout_s
        self._released = False
        self._chunked = False
        self._chunk_left = 0  # bytes of the current chunk still to come; -1: a size line next
        self._length: int | None = None  # bytes left with Content-Length; None: to the end
        self._keep_alive = not head[0].startswith(b"HTTP/1.0")
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
                self._chunk_left = -1
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise ConnectionFailed("the endpoint sent a malformed answer head") from None
                if length < 0 or self._length not in (None, length):
                    raise ConnectionFailed("the endpoint sent a malformed answer head")
                self._length = length
            elif name == b"connection" and b"close" in value.lower():
                self._keep_alive = False
        if self._chunked:
            self._length = None
        self._done = status in (204, 304) or self._length == 0
        if not self._chunked and self._length is None and not self._done:
            self._keep_alive = False  # the body ends with the connection

    @property
    def headers(self) -> CIMultiDict[str]:
        """The response's headers (built when asked: only errors need them)."""
        headers: CIMultiDict[str] = CIMultiDict()
        for line in self._head[1:]:
            name, _, value = line.partition(b":")
            headers.add(name.strip().decode("latin-1"), value.strip().decode("latin-1"))
        return headers

    def pause_reading(self) -> None:
        """Leave what arrives in the kernel until the next read."""
        transport = self._conn.transport
        if transport is not None and not self._conn.closed:
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`."""
        transport = self._conn.transport
        if transport is not None and not self._conn.closed:
            transport.resume_reading()

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some if none have); b"" at its end."""
        conn = self._conn
        try:
            while not self._done:
                data = self._decode() if conn.buffer else b""
                if data:
                    return data
                if self._done:
                    break
                if not await conn.more(self._timeout_s):
                    if self._length is None and not self._chunked:
                        self._done = True  # read to the end: this was the end
                        break
                    raise ConnectionFailed("the endpoint closed the connection mid-answer")
        except BaseException:
            self.release()  # not read to its end: closed
            raise
        self.release()
        return b""

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (refused past :data:`MAX_BODY_BYTES`), or with ``limit``
        its first ``limit`` bytes, the rest left unread (the connection is dropped)."""
        most = MAX_BODY_BYTES if limit is None else limit
        parts: list[bytes] = []
        size = 0
        while size < most:
            data = await self.readany()
            if not data:
                return b"".join(parts)
            parts.append(data)
            size += len(data)
        self.release()  # not read to its end: the connection is closed
        if limit is None:
            raise ConnectionFailed("the endpoint's answer is too large")
        return b"".join(parts)[:limit]

    def _decode(self) -> bytes:
        """Body bytes out of the buffer, as far as they can be taken now."""
        conn = self._conn
        if not self._chunked:
            if self._length is None:
                return conn.take()
            data = conn.take(self._length)
            self._length -= len(data)
            self._done = self._length == 0
            return data
        buffer = conn.buffer
        out: list[bytes] = []
        while buffer:
            if self._chunk_left > 0:
                data = conn.take(self._chunk_left)
                self._chunk_left -= len(data)
                out.append(data)
                if self._chunk_left:
                    break
                self._chunk_left = -2  # the CRLF after the data
            elif self._chunk_left == -2:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise ConnectionFailed("the endpoint sent a malformed chunk")
                del buffer[:2]
                self._chunk_left = -1
            else:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise ConnectionFailed("the endpoint sent a malformed chunk")
                    break
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                # Hex digits only: int() would also take a sign, "0x" or "_".
                if not size_text or size_text.strip(_HEX_DIGITS):
                    raise ConnectionFailed("the endpoint sent a malformed chunk")
                size = int(size_text, 16)
                if size == 0:
                    # The last chunk: its trailers, if any, end with an empty line.
                    trailer_end = buffer.find(b"\r\n\r\n", end)
                    if trailer_end >= 0:
                        del buffer[: trailer_end + 4]
                        self._done = True
                    break
                del buffer[: end + 2]
                self._chunk_left = size
        return b"".join(out)

    def release(self) -> None:
        """Give the connection back if its answer was read to the end; else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if not self._done and conn.buffer and not conn.closed:
            # A stream ends at [DONE]; the body's own end is often already here.
            try:
                if self._decode():
                    self._done = False
            except ConnectionFailed:
                self._done = False
        if self._done and self._keep_alive and not conn.closed and not conn.buffer:
            self._pool._put_back(conn)
        else:
            conn.abort()
            self._pool._forget()


class HTTPPool:
    """Keep-alive connections to one endpoint's origin, and POSTs over them."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("an endpoint's base_url must be an http:// or https:// URL")
        self._host = parsed.host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._tls = parsed.scheme == "https"
        self._ssl = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._slots = asyncio.Semaphore(limit)
        self._lookup: asyncio.Task[list[tuple[str, int]]] | None = None
        self._addresses_until = 0.0
        self._idle: list[_Connection] = []
        self._open = 0
        host_header = parsed.raw_host or self._host
        if ":" in host_header:
            host_header = f"[{host_header}]"
        if not parsed.is_default_port():
            host_header = f"{host_header}:{self._port}"
        lines = [f"POST {parsed.raw_path_qs} HTTP/1.1", f"Host: {host_header}"]
        for name, value in headers.items():
            if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0:"):
                raise ValueError(f"header {name} is not a valid header value")
            lines.append(f"{name}: {value}")
        lines += ["Accept-Encoding: identity", "User-Agent: botline", "Content-Length: "]
        self._head = "\r\n".join(lines).encode("latin-1")

    @property
    def open_connections(self) -> int:
        """Connections open now, in use or idle."""
        return self._open

    async def post(self, body: bytes) -> Response:
        """Send ``body``; the answer once its head has arrived. The caller must
        :meth:`Response.release` it (reading it to its end does)."""
        await self._slots.acquire()
        try:
            request = b"%s%d\r\n\r\n%s" % (self._head, len(body), body)
            conn, reused = await self._connection()
            try:
                return await self._exchange(conn, request)
            except ConnectionFailed:
                if not reused or conn.heard:
                    raise
            # A kept-alive connection the server had closed as we wrote to it:
            # nothing of an answer came, so the request is sent once more, fresh.
            conn, _ = await self._connection(fresh=True)
            return await self._exchange(conn, request)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, conn: _Connection, request: bytes) -> Response:
        assert conn.transport is not None
        conn.heard = False
        conn.transport.write(request)
        try:
            return await self._read_head(conn)
        except BaseException:
            conn.abort()
            self._forget(slot=False)
            raise

    async def _read_head(self, conn: _Connection) -> Response:
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(conn.buffer) > MAX_HEAD_BYTES:
                    raise ConnectionFailed("the endpoint's answer head is too large")
                if not await conn.more(self._read_timeout_s):
                    raise ConnectionFailed("the endpoint closed the connection")
                end = conn.buffer.find(b"\r\n\r\n")
            head = conn.take(end + 4)[:-4].split(b"\r\n")
            status_line = head[0].split(b" ", 2)
            try:
                status = int(status_line[1])
            except (IndexError, ValueError):
                raise ConnectionFailed("the endpoint sent a malformed answer head") from None
            if not status_line[0].startswith(b"HTTP/1."):
                raise ConnectionFailed("the endpoint sent a malformed answer head")
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            return Response(self, conn, status, head, self._read_timeout_s)

    async def _connection(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle kept-alive connection, or a new one; and whether it was reused."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn, True
            conn.abort()
            self._open -= 1
        ssl_context: ssl.SSLContext | None = None
        if self._tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                conn = await self._connect(ssl_context)
        except OSError as exc:
            self._open -= 1
            raise ConnectionFailed(
                f"cannot connect to the endpoint ({type(exc).__name__})"
            ) from exc
        except BaseException:
            self._open -= 1
            raise
        return conn, False

    async def _connect(self, ssl_context: ssl.SSLContext | None) -> _Connection:
        """A new connection to the first of the host's addresses that takes one."""
        loop = asyncio.get_running_loop()
        lookup = self._lookup
        if lookup is None or (
            lookup.done()
            and (
                lookup.cancelled()
                or lookup.exception() is not None
                or loop.time() >= self._addresses_until
            )
        ):
            # One lookup, in a task of the pool's, for every caller that needs it
            # now: one caller going away does not fail the others'. A failed one is
            # not kept.
            lookup = self._lookup = loop.create_task(self._resolve())
        found = await asyncio.shield(lookup)
        failure: OSError = OSError("no address")
        for host, port in found:
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=self._host if ssl_context else None,
                )
            except OSError as exc:
                failure = exc
                continue
            return conn
        raise failure

    async def _resolve(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        self._addresses_until = loop.time() + DNS_TTL_S
        return [(str(info[4][0]), int(info[4][1])) for info in infos]

    def _put_back(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        self._slots.release()

    def _forget(self, slot: bool = True) -> None:
        """A connection was closed; with ``slot``, its call has ended too."""
        self._open -= 1
        if slot:
            self._slots.release()

    async def close(self) -> None:
        """Close the idle connections (those in use close when their call ends)."""
        lookup, self._lookup = self._lookup, None
        if lookup is not None and not lookup.done():
            lookup.cancel()
            await asyncio.gather(lookup, return_exceptions=True)
        while self._idle:
            conn = self._idle.pop()
            conn.abort()
            self._open -= 1
