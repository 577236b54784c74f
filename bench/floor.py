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

With ``--guarded`` (the bench's ``floor-guarded``) both roles ask of RabbitMQ what
botline's guarantees ask of it, and nothing more of themselves: jobs go to a priority
queue (``x-max-priority``) with a priority and a per-message expiration, ``mandatory``,
on a channel in confirm mode, and the front answers only once the job's confirm is in;
the relay takes jobs with a prefetch and manual acks, and publishes each answer through
a direct exchange that has an alternate exchange, the job's ack written ahead of it in
the same write. A nack or a return is not handled (none comes in the bench).
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
from pamqp.common import FieldTable
from yarl import URL

from bench.raw_amqp import RawChannel
from shared.loop import new_event_loop
from shared.priority import MAX_PRIORITY
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


_PRIORITY = 4  # a guarded job's priority: botline's "normal" (shared/priority.py)
_EXPIRATION = b"300000"  # ms: a guarded job's per-message expiration
_PREFETCH = 1000  # the guarded relay's jobs in flight at once (botline's worker: its own)


def _queue_arguments(guarded: bool) -> FieldTable | None:
    return {"x-max-priority": MAX_PRIORITY} if guarded else None


def _exchanges(jobs: str) -> tuple[str, str]:
    """The guarded floor's reply exchange and its alternate."""
    return f"{jobs}.replies", f"{jobs}.unroutable"


class _Front:
    def __init__(self, channel: RawChannel, jobs: str, replies: str, guarded: bool) -> None:
        self._channel = channel
        self._jobs = jobs
        self._replies = replies.encode()
        self._guarded = guarded
        # A job's correlation id is its number, from 1: guarded, its publish's delivery
        # tag too (the channel publishes nothing else once in confirm mode).
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, _Caller | _Waiter] = {}
        # Guarded: the tags not yet confirmed, and the answers that came before their
        # job's confirm.
        self._unconfirmed: set[int] = set()
        self._held: dict[int, tuple[_Caller | _Waiter, bytes]] = {}

    def request(self, caller: _Caller | _Waiter, body: bytes) -> None:
        number = next(self._ids)
        correlation = b"%d" % number
        self._waiting[correlation] = caller
        if not self._guarded:
            self._channel.publish(self._jobs, body, correlation=correlation, reply_to=self._replies)
            return
        self._unconfirmed.add(number)
        self._channel.publish(
            self._jobs,
            body,
            correlation=correlation,
            reply_to=self._replies,
            mandatory=True,
            priority=_PRIORITY,
            expiration=_EXPIRATION,
            message_id=correlation,
        )

    def reply(self, correlation: bytes, _reply_to: bytes, body: bytes) -> None:
        caller = self._waiting.pop(correlation, None)
        if caller is None:
            return
        tag = int(correlation)
        if tag in self._unconfirmed:
            self._held[tag] = (caller, body)
        else:
            caller.answer(body)

    def confirmed(self, tag: int, multiple: bool) -> None:
        tags = [t for t in self._unconfirmed if t <= tag] if multiple else [tag]
        for each in tags:
            self._unconfirmed.discard(each)
            held = self._held.pop(each, None)
            if held is not None:
                held[0].answer(held[1])


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


async def front(url: str, jobs: str, port: int, http: str = "raw", guarded: bool = False) -> None:
    """Serve HTTP on ``port`` until cancelled: with ``http`` "raw" an ``asyncio.Protocol``
    of this module's, with "aiohttp" aiohttp's server."""
    channel = await RawChannel.open(url, "botline bench floor")
    await channel.declare(jobs, arguments=_queue_arguments(guarded))
    replies = await channel.declare(exclusive=True)
    front_ = _Front(channel, jobs, replies, guarded)
    if guarded:
        exchange, unroutable = _exchanges(jobs)
        await channel.declare_exchange(unroutable, "fanout")
        await channel.declare_exchange(exchange, "direct", {"alternate-exchange": unroutable})
        await channel.bind(replies, exchange, replies)
        await channel.confirm_select()
    await channel.consume(replies, front_.reply, on_confirm=front_.confirmed)
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
    def __init__(self, channel: RawChannel, endpoint: URL, exchange: str = "") -> None:
        self._channel = channel
        self._endpoint = endpoint
        self._exchange = exchange  # guarded: the reply exchange, and jobs are acked
        self.request_head = (
            f"POST {endpoint.raw_path_qs} HTTP/1.1\r\nHost: {endpoint.raw_authority}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        ).encode()
        self._idle: list[_Model] = []
        self._queued: deque[tuple[bytes, bytes, bytes]] = deque()
        self._tags: dict[bytes, int] = {}  # guarded: each job's delivery tag, for its ack

    def job(self, correlation: bytes, reply_to: bytes, body: bytes) -> None:
        if self._exchange:
            self._tags[correlation] = self._channel.delivery_tag
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
        self._channel.publish(
            reply_to.decode(),
            body,
            correlation=correlation,
            exchange=self._exchange,
            ack=self._tags.pop(correlation, 0),
        )
        self._next(model)

    def lost(self, model: _Model) -> None:
        if model in self._idle:
            self._idle.remove(model)


async def relay(url: str, jobs: str, endpoint: str, guarded: bool = False) -> None:
    """Relay jobs to ``endpoint`` until cancelled."""
    channel = await RawChannel.open(url, "botline bench floor")
    await channel.declare(jobs, arguments=_queue_arguments(guarded))
    relay_ = _Relay(channel, URL(endpoint), _exchanges(jobs)[0] if guarded else "")
    if guarded:
        await channel.qos(_PREFETCH)
    await channel.consume(jobs, relay_.job, no_ack=not guarded)
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
        await front(args.amqp, args.queue, args.port, args.http, args.guarded)
    else:
        await relay(args.amqp, args.queue, args.endpoint, args.guarded)


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
    parser.add_argument(
        "--guarded",
        action="store_true",
        help="ask of RabbitMQ what botline's guarantees ask (both roles alike)",
    )
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
