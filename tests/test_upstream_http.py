"""The worker's own HTTP/1.1 client for model endpoints, against raw loopback servers.

Each server here is a few lines of asyncio writing exactly the bytes a test
needs (odd framings, closes, stalls), which no real framework would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.worker import upstream_http
from services.worker.upstream_http import ConnectionFailed, HTTPPool, Response
from shared.loop import new_event_loop

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server calling ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.port = 0
        self.closed = asyncio.Event()  # set each time the server has closed a connection
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.closed.set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def pool(self, limit: int = 8, read_timeout_s: float = 5.0, path: str = "/v1/x") -> HTTPPool:
        return HTTPPool(
            f"http://127.0.0.1:{self.port}{path}",
            {"Content-Type": "application/json"},
            limit=limit,
            connect_timeout_s=2.0,
            read_timeout_s=read_timeout_s,
        )


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (framed by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def keep_answering(
    answer: bytes, requests: list[bytes] | None = None, delay_s: float = 0.0
) -> Handler:
    """A handler answering every request on a connection with ``answer`` (after ``delay_s``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if requests is not None:
                requests.append(head + body)
            if delay_s:
                await asyncio.sleep(delay_s)
            writer.write(answer)
            await writer.drain()

    return handle


def answer_once(answer: bytes) -> Handler:
    """A handler answering one request with ``answer``, then closing the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    return handle


def sized(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        len(body),
        extra,
        body,
    )


async def whole(pool: HTTPPool, body: bytes = b"{}") -> tuple[Response, bytes]:
    response = await pool.post(body)
    return response, await response.read()


async def test_a_sized_answer_is_read_and_its_connection_kept() -> None:
    requests: list[bytes] = []
    async with RawServer(keep_answering(sized(b'{"ok":1}'), requests)) as server:
        pool = server.pool(path="/v1/chat/completions?api-version=2")
        for _ in range(3):
            response, body = await whole(pool, b'{"q":"hi"}')
            assert (response.status, body) == (200, b'{"ok":1}')
        await pool.close()
    assert server.connections == 1
    head = requests[0].decode()
    assert head.startswith("POST /v1/chat/completions?api-version=2 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    assert "Content-Length: 10\r\n" in head
    assert head.endswith('\r\n\r\n{"q":"hi"}')
    assert "Accept-Encoding: identity\r\n" in head
    assert "cookie" not in head.lower()


async def test_a_chunked_answer_arriving_a_byte_at_a_time_is_decoded() -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for event in events:
        wire += b"%x;ext=1\r\n%s\r\n" % (len(event), event)
    wire += b"0\r\nX-Trailer: yes\r\n\r\n"

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for i in range(len(wire)):
                writer.write(wire[i : i + 1])
                await writer.drain()

    async with RawServer(trickle) as server:
        pool = server.pool()
        for _ in range(2):
            _, body = await whole(pool)
            assert body == b"".join(events)
        assert pool.open_connections == 1
        await pool.close()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        # An answer framed by the close: read whole, and its connection not reused.
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", b"all of it"),
        # No Connection: close, as a server timing out an idle keep-alive does: the
        # close comes while the connection is idle, and it is replaced, no error
        # (whether the pool has seen the close yet or finds out as it sends).
        (sized(b"ok"), b"ok"),
    ],
)
async def test_a_connection_its_server_closed_is_replaced(answer: bytes, body: bytes) -> None:
    async with RawServer(answer_once(answer)) as server:
        pool = server.pool()
        for _ in range(2):
            assert (await whole(pool))[1] == body
            await asyncio.wait_for(server.closed.wait(), 2.0)
            server.closed.clear()
        await pool.close()
    assert server.connections == 2


async def test_a_close_mid_body_is_an_error_not_a_short_answer() -> None:
    cut = answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly half")
    async with RawServer(cut) as server:
        pool = server.pool()
        with pytest.raises(ConnectionFailed, match="mid-answer"):
            await whole(pool)
        assert pool.open_connections == 0
        # Its slot was given back: the pool still answers within its limit.
        server.handler = keep_answering(sized(b"ok"))
        assert (await whole(pool))[1] == b"ok"
        await pool.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"SMTP 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_a_malformed_head_is_refused(head: bytes) -> None:
    async with RawServer(keep_answering(head)) as server:
        pool = server.pool()
        with pytest.raises(ConnectionFailed, match="malformed"):
            await whole(pool)
        await pool.close()


@pytest.mark.parametrize("size", [b"-5", b"0x5", b"+5", b"5_0", b"", b"zz"])
async def test_a_malformed_chunk_size_is_refused(size: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nhello\r\n0\r\n\r\n"
    async with RawServer(keep_answering(answer % size)) as server:
        pool = server.pool()
        with pytest.raises(ConnectionFailed, match="malformed chunk"):
            await whole(pool)
        await pool.close()


async def test_silence_past_the_read_timeout_is_a_timeout() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async with RawServer(stall) as server:
        pool = server.pool(read_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await pool.post(b"{}")
        assert await response.readany() == b"abc"
        with pytest.raises(TimeoutError):
            await response.readany()
        assert 0.25 <= loop.time() - started < 2.0
        response.release()
        await pool.close()


async def test_a_refused_connection_fails_at_once() -> None:
    async with RawServer(keep_answering(b"")) as server:
        pool = server.pool()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        await pool.post(b"{}")
    assert loop.time() - started < 1.0
    assert pool.open_connections == 0


async def test_calls_beyond_the_limit_wait_for_a_connection() -> None:
    slow = keep_answering(sized(b"ok"), delay_s=0.05)
    async with RawServer(slow) as server:
        pool = server.pool(limit=2)
        answers = await asyncio.gather(*(whole(pool) for _ in range(6)))
        assert [body for _, body in answers] == [b"ok"] * 6
        await pool.close()
    assert server.most_open == 2


async def test_an_answer_left_unread_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async with RawServer(endless) as server:
        pool = server.pool()
        response = await pool.post(b"{}")
        assert (await response.readany()).startswith(b"hello")
        response.release()
        await asyncio.wait_for(closed.wait(), 2.0)  # the upstream learns the caller went away
        assert pool.open_connections == 0
        await pool.close()


async def test_an_error_answer_gives_its_headers() -> None:
    error = sized(b'{"error":{}}', "429 Too Many Requests", b"Retry-After: 3\r\nX-A: 1\r\n")
    async with RawServer(keep_answering(error)) as server:
        pool = server.pool()
        response, body = await whole(pool)
        assert response.status == 429
        assert body == b'{"error":{}}'
        assert response.headers["retry-after"] == "3"
        await pool.close()


def test_a_header_value_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="Authorization"):
        HTTPPool("http://h/v1", {"Authorization": "Bearer k\r\nX: y"}, 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="http"):
        HTTPPool("ftp://h/v1", {}, 1, 1.0, 1.0)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *subject,
            *files,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def https_is_verified(certificate: tuple[Path, Path]) -> None:
    """Against a loopback HTTPS server with that certificate: trusted, it answers;
    checked against the system's trust store, the call fails."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        keep_answering(sized(b"secret ok")), "127.0.0.1", 0, ssl=context
    )
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = HTTPPool(url, {}, 2, 2.0, 2.0, ssl_context=trusting)
        assert (await whole(pool))[1] == b"secret ok"
        await pool.close()
        untrusting = HTTPPool(url, {}, 2, 2.0, 2.0)
        with pytest.raises(ConnectionFailed, match="SSLCertVerificationError"):
            await whole(untrusting)
        await untrusting.close()
    finally:
        server.close()


async def test_https_is_verified_against_the_trust_store(certificate: tuple[Path, Path]) -> None:
    await https_is_verified(certificate)


def test_the_client_runs_on_the_workers_event_loop(certificate: tuple[Path, Path]) -> None:
    """uvloop's transports (and its TLS) are not asyncio's: the worker's loop, not the tests'."""

    async def scenario() -> None:
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire += b"5\r\nhello\r\n" + b"6\r\n world\r\n" + b"0\r\n\r\n"

        async def two_parts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(wire[:60])
                await asyncio.sleep(0.02)
                writer.write(wire[60:])
                await writer.drain()

        async with RawServer(two_parts) as server:
            pool = server.pool()
            response = await pool.post(b"{}")
            first = await response.readany()
            response.pause_reading()  # what a paced stream does between reads
            await asyncio.sleep(0.05)
            response.resume_reading()
            assert first + await response.read() == b"hello world"
            assert (await whole(pool))[1] == b"hello world"
            await pool.close()
        assert server.connections == 1
        await https_is_verified(certificate)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        loop = runner.get_loop()
        assert type(loop).__module__.startswith("uvloop")
        runner.run(scenario())


async def test_an_answer_that_began_is_never_asked_again() -> None:
    """Only a kept-alive connection that was closed before a byte of its answer
    came is retried: a request the endpoint began to answer is not sent twice."""
    requests: list[bytes] = []

    async def good_then_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(b"".join(await read_request(reader)))
        writer.write(sized(b"ok"))
        await writer.drain()
        requests.append(b"".join(await read_request(reader)))
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()

    async with RawServer(good_then_garbage) as server:
        pool = server.pool()
        assert (await whole(pool))[1] == b"ok"
        with pytest.raises(ConnectionFailed, match="malformed"):
            await whole(pool)
        await pool.close()
    assert len(requests) == 2
    assert server.connections == 1


async def test_a_burst_of_new_connections_looks_the_name_up_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    original = loop.getaddrinfo

    async def counted(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        if len(lookups) == 1:
            raise socket.gaierror(socket.EAI_AGAIN, "temporary failure")
        await asyncio.sleep(0.02)  # a lookup takes a while: the burst comes meanwhile
        return await original(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", counted)

    slow = keep_answering(sized(b"ok"), delay_s=0.05)
    async with RawServer(slow) as server:
        pool = HTTPPool(f"http://localhost:{server.port}/v1", {}, 16, 2.0, 2.0)
        # A failed lookup is an error, and is not kept.
        with pytest.raises(ConnectionFailed, match="gaierror"):
            await whole(pool)
        answers = await asyncio.gather(*(whole(pool) for _ in range(8)))
        assert [body for _, body in answers] == [b"ok"] * 8
        await pool.close()
    assert lookups == ["localhost", "localhost"]
    assert server.connections == 8


async def test_a_body_past_the_cap_is_refused_and_a_start_is_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_http, "MAX_BODY_BYTES", 8)
    async with RawServer(keep_answering(sized(b"0123456789abcdef"))) as server:
        pool = server.pool()
        with pytest.raises(ConnectionFailed, match="too large"):
            await whole(pool)
        # An error answer's start is all its reader wants.
        response = await pool.post(b"{}")
        assert await response.read(4) == b"0123"
        await pool.close()
