"""``python -m bench.amqp_probe``: the CPU one AMQP message costs a client, aiormq
as it comes, aiormq as botline runs it, and framing of our own.

One process publishes messages to a queue of its own and consumes them (no ack) on the
same connection, ``--window`` in flight, and reads its own CPU time (``process_time``)
per message, publish and delivery together. Three clients take turns:

- ``aiormq``: aiormq as it comes (``basic_publish(wait=False)`` on a channel without
  confirms, a ``basic_consume`` callback, the properties a reply event carries);
- ``aiormq+botline``: the same with botline's frames (shared/amqp_frames.py: the
  socket read in chunks, a message's frames coded with ``struct``), its publish
  without a wait (``shared.amqp.publish_now``) and its consumer, handed each delivery
  as it is read (``shared.amqp.consume``, a plain function as the gateway's events');
- ``frames``: the least a client can do: pamqp for the handshake, then each publish one
  ``transport.write`` of frames packed with ``struct``, and deliveries parsed from the read
  buffer (their properties and body) without a queue, lock or task per frame.

The last is not botline's code and is not a client to ship (no confirms, no
reconnects, no flow control); it measures the floor under an AMQP data path of our own
(docs/performance.md). Talks to the running RabbitMQ (the first of
``BOTLINE_AMQP_URL``; guest on localhost by default) with an exclusive, auto-deleted queue.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from typing import cast

import aiormq
import pamqp.commands as spec
import pamqp.frame
from yarl import URL

from shared import amqp_frames
from shared.amqp import Outgoing, consume, publish_now
from shared.loop import new_event_loop
from shared.settings import CommonSettings

_FRAME_END = b"\xce"
_HEADER = struct.Struct(">BHI")  # frame type, channel, size
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, property flags
# Properties a reply event carries, in AMQP's order: content-type, delivery-mode,
# correlation-id, message-id, type.
_FLAGS = 0x8000 | 0x1000 | 0x0400 | 0x0080 | 0x0020
_DELIVER = struct.pack(">HH", 60, 60)


def _short(text: str) -> bytes:
    data = text.encode()
    return bytes((len(data),)) + data


class _Count:
    """Deliveries so far; awaitable until a number of them."""

    def __init__(self) -> None:
        self.n = 0
        self._target = 0
        self._waiter: asyncio.Future[None] | None = None

    def hit(self) -> None:
        self.n += 1
        if self._waiter is not None and self.n >= self._target and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, target: int) -> None:
        self._target = target
        if self.n < target:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


async def _drive(
    publish: Callable[[int], Awaitable[None]], count: _Count, n: int, window: int
) -> float:
    """CPU seconds per message for ``n`` messages, ``window`` at a time."""
    started = time.process_time()
    sent = 0
    while sent < n:
        for _ in range(window):
            await publish(sent)
            sent += 1
        await count.until(sent)
    return (time.process_time() - started) / n


async def _aiormq(url: str, n: int, window: int, body: bytes, *, ours: bool = False) -> float:
    connection = await aiormq.connect(url)
    try:
        # The concrete channel: ``wait`` is missing from aiormq's abstract one.
        channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=False))
        declared = await channel.queue_declare(exclusive=True, auto_delete=True)
        queue = declared.queue
        assert queue is not None
        count = _Count()

        def delivered(message: aiormq.abc.DeliveredMessage) -> None:
            properties = message.header.properties
            if properties.correlation_id and properties.message_type and message.body:
                count.hit()

        async def delivered_in_task(message: aiormq.abc.DeliveredMessage) -> None:
            delivered(message)

        if ours:  # handed over as read, no task (as the gateway's events)
            await consume(channel, queue, delivered, no_ack=True)
        else:  # a task per message (as aiormq runs every consumer)
            await channel.basic_consume(queue, delivered_in_task, no_ack=True)

        async def publish(i: int) -> None:
            properties = spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=1,
                correlation_id=f"job-{i}",
                message_id=f"job-{i}.1.0",
                message_type="chat.end",
            )
            if not (ours and publish_now(channel, Outgoing(body, properties, "", queue))):
                await channel.basic_publish(
                    body, routing_key=queue, properties=properties, wait=False
                )

        return await _drive(publish, count, n, window)
    finally:
        await connection.close()


async def _aiormq_plain(url: str, n: int, window: int, body: bytes) -> float:
    amqp_frames.uninstall()
    return await _aiormq(url, n, window, body)


async def _aiormq_frames(url: str, n: int, window: int, body: bytes) -> float:
    amqp_frames.install()
    try:
        return await _aiormq(url, n, window, body, ours=True)
    finally:
        amqp_frames.uninstall()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, object]:
    head = await reader.readexactly(7)
    rest = await reader.readexactly(_HEADER.unpack(head)[2] + 1)
    _, channel, frame = pamqp.frame.unmarshal(head + rest)
    return channel, frame


async def _call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: int, method: object
) -> object:
    writer.write(pamqp.frame.marshal(method, channel))  # type: ignore[arg-type]
    return (await _read_frame(reader))[1]


async def _frames(url: str, n: int, window: int, body: bytes) -> float:
    where = URL(url)
    reader, writer = await asyncio.open_connection(where.host, where.port or 5672)
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await _read_frame(reader)  # Connection.Start
        login = f"\0{where.user or 'guest'}\0{where.password or 'guest'}"
        start_ok = spec.Connection.StartOk(
            client_properties={"product": "botline amqp probe"}, response=login
        )
        tune = await _call(reader, writer, 0, start_ok)
        assert isinstance(tune, spec.Connection.Tune)
        writer.write(
            pamqp.frame.marshal(spec.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        )
        vhost = where.path[1:] or "/"
        await _call(reader, writer, 0, spec.Connection.Open(virtual_host=vhost))
        await _call(reader, writer, 1, spec.Channel.Open())
        declared = await _call(
            reader, writer, 1, spec.Queue.Declare(exclusive=True, auto_delete=True)
        )
        assert isinstance(declared, spec.Queue.DeclareOk)
        queue = declared.queue or ""
        await _call(reader, writer, 1, spec.Basic.Consume(queue=queue, no_ack=True))
        count = _Count()
        consume = asyncio.create_task(_consume(reader, count))
        method = pamqp.frame.marshal(spec.Basic.Publish(routing_key=queue), 1)
        transport = writer.transport

        async def publish(i: int) -> None:
            job = f"job-{i}"
            properties = b"".join(
                (
                    _short("application/json"),
                    b"\x01",
                    _short(job),
                    _short(f"{job}.1.0"),
                    _short("chat.end"),
                )
            )
            header = _CONTENT.pack(60, 0, len(body), _FLAGS) + properties
            transport.write(
                b"".join(
                    (
                        method,
                        _HEADER.pack(2, 1, len(header)),
                        header,
                        _FRAME_END,
                        _HEADER.pack(3, 1, len(body)),
                        body,
                        _FRAME_END,
                    )
                )
            )

        try:
            return await _drive(publish, count, n, window)
        finally:
            consume.cancel()
    finally:
        writer.close()


async def _consume(reader: asyncio.StreamReader, count: _Count) -> None:
    """Deliveries parsed from what each read brings: properties read, body gathered."""
    buffer = b""
    body_left = 0
    while True:
        data = await reader.read(1 << 16)
        if not data:
            return
        buffer += data
        at = 0
        while len(buffer) - at >= 8:
            kind, _, size = _HEADER.unpack_from(buffer, at)
            end = at + 7 + size
            if end + 1 > len(buffer):
                break
            if kind == 1 and buffer[at + 7 : at + 11] == _DELIVER:
                body_left = -1  # a header frame comes next
            elif kind == 2 and body_left == -1:
                _, _, body_left, flags = _CONTENT.unpack_from(buffer, at + 7)
                fields, pos = [], at + 21
                for bit in (0x8000, 0x1000, 0x0400, 0x0080, 0x0020):
                    if flags & bit:
                        if bit == 0x1000:
                            pos += 1
                            continue
                        length = buffer[pos]
                        fields.append(buffer[pos + 1 : pos + 1 + length])
                        pos += 1 + length
            elif kind == 3 and body_left > 0:
                body_left -= size
                if body_left == 0:
                    count.hit()
            at = end + 1
        buffer = buffer[at:]


async def _main(args: argparse.Namespace) -> None:
    body = b'{"type":"chat.end","text":"' + b"tok " * 32 + b'"}'
    clients = {"aiormq": _aiormq_plain, "aiormq+botline": _aiormq_frames, "frames": _frames}
    figures: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(args.rounds):
        for name, client in clients.items():
            figures[name].append(await client(args.url, args.messages, args.window, body) * 1e6)
    print(
        f"{args.messages} messages a round, {args.window} in flight, {args.rounds} rounds; "
        "client CPU per message (publish + delivery), median of rounds:"
    )
    for name, values in figures.items():
        print(f"  {name:14s} {statistics.median(values):7.1f} us  (rounds: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_probe", description=__doc__)
    # The first of botline's own broker URLs (BOTLINE_AMQP_URL), guest on localhost by default.
    parser.add_argument("--url", default=CommonSettings().amqp_urls[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runner = asyncio.Runner(loop_factory=new_event_loop)
    with runner:
        runner.run(_main(args))


if __name__ == "__main__":
    main()
