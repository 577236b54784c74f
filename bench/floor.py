"""``python -m bench.floor front|relay``: the least a service of botline's design can do.

The design card fixes the path of a whole answer: an HTTP front takes the request, puts
it on RabbitMQ as a job, a worker process takes the job, calls the model, and puts the
answer back on RabbitMQ, where the front takes it and answers the caller. This module is
that path with nothing else on it, as a benchmark target (``floor`` in ``python -m bench``)
beside the direct call and botline:

- ``front``: an HTTP/1.1 server (an ``asyncio.Protocol``) that publishes each POST's body,
  as it came, to the job queue with a correlation id and its own reply queue, and writes
  the body of the answer that comes back as the response (a GET is answered 200 at once:
  the bench's readiness probe);
- ``relay``: consumes the job queue, sends each body to the model endpoint over kept-alive
  HTTP/1.1 connections (one per job in flight), and publishes the endpoint's body back.

AMQP is spoken with raw frames (``bench.raw_amqp``: each publish one socket write, each
delivery parsed from the read buffer): no publisher confirms, no acks (``no_ack``
consumers), no reconnects; and no keys, limits, usage, validation, logs or errors. None of that
may be dropped from a product; it is left out here so that what this target adds over the
direct call is the floor under the design itself: two broker hops and two processes that
each wake for every step. It is not a service to ship: only the bench starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
from collections import deque
from typing import cast

from aiohttp import web
from yarl import URL

from bench.raw_amqp import RawChannel
from shared.loop import new_event_loop
from shared.settings import CommonSettings

_RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def _http_message(buffer: bytearray) -> tuple[bytes, bytes] | None:
    """Take one whole HTTP/1.1 message (head, body) off ``buffer``, if it holds one.

    Bodies by Content-Length only: what both the load generator and the fake model
    endpoint send for whole answers.
    """
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    end = head_end + 4 + length
    if len(buffer) < end:
        return None
    body = bytes(buffer[head_end + 4 : end])
    del buffer[:end]
    return head, body


# --- front ---------------------------------------------------------------------------------
class _Caller(asyncio.Protocol):
    def __init__(self, front: _Front) -> None:
        self._front = front
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (message := _http_message(self._buffer)) is not None:
            head, body = message
            if head.startswith(b"GET "):  # the bench's readiness probe: up and consuming
                self.answer(b"")
            else:
                self._front.request(self, body)

    def answer(self, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_RESPONSE_HEAD % len(body) + body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _Front:
    def __init__(self, channel: RawChannel, jobs: str, replies: str) -> None:
        self._channel = channel
        self._jobs = jobs
        self._replies = replies.encode()
        self._ids = itertools.count()
        self._waiting: dict[bytes, _Caller | _Waiter] = {}

    def request(self, caller: _Caller | _Waiter, body: bytes) -> None:
        correlation = b"%d" % next(self._ids)
        self._waiting[correlation] = caller
        self._channel.publish(self._jobs, body, correlation=correlation, reply_to=self._replies)

    def reply(self, correlation: bytes, _reply_to: bytes, body: bytes) -> None:
        caller = self._waiting.pop(correlation, None)
        if caller is not None:
            caller.answer(body)


class _Waiter:
    """An aiohttp handler's answer to come."""

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self._future = future

    def answer(self, body: bytes) -> None:
        if not self._future.done():
            self._future.set_result(body)


async def _aiohttp_server(front_: _Front, port: int) -> web.AppRunner:
    """The front's HTTP served by aiohttp's server, as botline's gateway is: one handler."""

    async def chat(request: web.Request) -> web.Response:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        front_.request(_Waiter(future), await request.read())
        return web.Response(body=await future, content_type="application/json")

    async def ready(_request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def front(url: str, jobs: str, port: int, http: str = "raw") -> None:
    """Serve HTTP on ``port`` until cancelled: with ``http`` "raw" an ``asyncio.Protocol``
    of this module's, with "aiohttp" aiohttp's server."""
    channel = await RawChannel.open(url, "botline bench floor")
    await channel.declare(jobs)
    replies = await channel.declare(exclusive=True)
    front_ = _Front(channel, jobs, replies)
    await channel.consume(replies, front_.reply)
    try:
        if http == "aiohttp":
            stop = (await _aiohttp_server(front_, port)).cleanup
        else:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(lambda: _Caller(front_), "127.0.0.1", port)

            async def stop() -> None:
                server.close()

        try:
            await asyncio.Event().wait()
        finally:
            await stop()
    finally:
        channel.close()


# --- relay ---------------------------------------------------------------------------------
class _Model(asyncio.Protocol):
    """One kept-alive connection to the model endpoint, one job at a time."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay
        self._buffer = bytearray()
        self._job: tuple[bytes, bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, correlation: bytes, reply_to: bytes, body: bytes) -> None:
        assert self.transport is not None
        self._job = (correlation, reply_to)
        self.transport.write(self._relay.request_head % len(body) + body)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        message = _http_message(self._buffer)
        if message is not None and self._job is not None:
            correlation, reply_to = self._job
            self._job = None
            self._relay.answered(self, correlation, reply_to, message[1])

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.lost(self)


class _Relay:
    def __init__(self, channel: RawChannel, endpoint: URL) -> None:
        self._channel = channel
        self._endpoint = endpoint
        self.request_head = (
            f"POST {endpoint.raw_path_qs} HTTP/1.1\r\nHost: {endpoint.raw_authority}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        ).encode()
        self._idle: list[_Model] = []
        self._queued: deque[tuple[bytes, bytes, bytes]] = deque()

    def job(self, correlation: bytes, reply_to: bytes, body: bytes) -> None:
        if self._idle:
            self._idle.pop().send(correlation, reply_to, body)
            return
        self._queued.append((correlation, reply_to, body))
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._endpoint.host or "127.0.0.1", self._endpoint.port or 80
        _, model = await loop.create_connection(lambda: _Model(self), host, port)
        self._next(model)

    def _next(self, model: _Model) -> None:
        if self._queued:
            model.send(*self._queued.popleft())
        else:
            self._idle.append(model)

    def answered(self, model: _Model, correlation: bytes, reply_to: bytes, body: bytes) -> None:
        self._channel.publish(reply_to.decode(), body, correlation=correlation)
        self._next(model)

    def lost(self, model: _Model) -> None:
        if model in self._idle:
            self._idle.remove(model)


async def relay(url: str, jobs: str, endpoint: str) -> None:
    """Relay jobs to ``endpoint`` until cancelled."""
    channel = await RawChannel.open(url, "botline bench floor")
    await channel.declare(jobs)
    relay_ = _Relay(channel, URL(endpoint))
    await channel.consume(jobs, relay_.job)
    try:
        await asyncio.Event().wait()
    finally:
        channel.close()


async def _run(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    if args.role == "front":
        await front(args.amqp, args.queue, args.port, args.http)
    else:
        await relay(args.amqp, args.queue, args.endpoint)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("role", choices=("front", "relay"))
    # The first of botline's own broker URLs (BOTLINE_AMQP_URL), guest on localhost by
    # default: from the environment, so that a password stays out of the command line.
    parser.add_argument("--amqp", default=CommonSettings().amqp_urls[0], help=argparse.SUPPRESS)
    parser.add_argument("--queue", required=True, help="the job queue (auto-deleted)")
    parser.add_argument("--port", type=int, help="front: the HTTP port")
    parser.add_argument(
        "--http", choices=("raw", "aiohttp"), default="raw", help="front: whose HTTP server"
    )
    parser.add_argument("--endpoint", help="relay: the model's chat-completions URL")
    args = parser.parse_args()
    if (args.role == "front") != (args.port is not None) or (
        args.role == "relay" and not args.endpoint
    ):
        parser.error("front takes --port, relay takes --endpoint")
    runner = asyncio.Runner(loop_factory=new_event_loop)
    with runner, contextlib.suppress(asyncio.CancelledError):
        runner.run(_run(args))


if __name__ == "__main__":
    main()
