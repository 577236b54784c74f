"""``python -m bench.amqp_probe``: the CPU one AMQP message costs a client, aiormq
as it comes, aiormq as botline runs it, and framing of our own.

One process publishes messages to a queue of its own and consumes them (no ack) on the
same connection, ``--window`` in flight, and reads its own CPU time (``process_time``)
per message, publish and delivery together, and the wall clock's: with ``--window 1``,
one message's trip through the broker, the hop a job and its answer each make.
Three clients take turns:

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
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

import aiormq
import pamqp.commands as spec

from bench.raw_amqp import RawChannel
from shared import amqp_frames
from shared.amqp import Outgoing, consume, publish_now
from shared.loop import new_event_loop
from shared.settings import CommonSettings


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


class Figures(NamedTuple):
    """Seconds per message: the client's CPU, and the wall clock's."""

    cpu: float
    wall: float


async def _drive(
    publish: Callable[[int], Awaitable[None]], count: _Count, n: int, window: int
) -> Figures:
    """Seconds per message for ``n`` messages, ``window`` at a time."""
    # The wall clock read outside the CPU clock at both ends: its interval holds the
    # CPU's, whose reads cost CPU themselves (read the other way round, a client
    # that is CPU-bound throughout measured a few ns more CPU than wall per message).
    clock = time.perf_counter()
    started = time.process_time()
    sent = 0
    while sent < n:
        for _ in range(window):
            await publish(sent)
            sent += 1
        await count.until(sent)
    cpu = time.process_time() - started
    return Figures(cpu / n, (time.perf_counter() - clock) / n)


async def _aiormq(url: str, n: int, window: int, body: bytes, *, ours: bool = False) -> Figures:
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


async def _aiormq_plain(url: str, n: int, window: int, body: bytes) -> Figures:
    amqp_frames.uninstall()
    return await _aiormq(url, n, window, body)


async def _aiormq_frames(url: str, n: int, window: int, body: bytes) -> Figures:
    amqp_frames.install()
    try:
        return await _aiormq(url, n, window, body, ours=True)
    finally:
        amqp_frames.uninstall()


async def _frames(url: str, n: int, window: int, body: bytes) -> Figures:
    channel = await RawChannel.open(url, "botline amqp probe")
    try:
        queue = await channel.declare(exclusive=True)
        count = _Count()
        await channel.consume(queue, lambda _correlation, _reply_to, _body: count.hit())

        async def publish(i: int) -> None:
            job = f"job-{i}".encode()
            channel.publish(
                queue,
                body,
                correlation=job,
                content_type=b"application/json",
                message_id=job + b".1.0",
                message_type=b"chat.end",
            )

        return await _drive(publish, count, n, window)
    finally:
        channel.close()


async def _main(args: argparse.Namespace) -> None:
    body = b'{"type":"chat.end","text":"' + b"tok " * 32 + b'"}'
    clients = {"aiormq": _aiormq_plain, "aiormq+botline": _aiormq_frames, "frames": _frames}
    figures: dict[str, list[Figures]] = {name: [] for name in clients}
    for _ in range(args.rounds):
        for name, client in clients.items():
            figures[name].append(await client(args.url, args.messages, args.window, body))
    print(
        f"{args.messages} messages a round, {args.window} in flight, {args.rounds} rounds; "
        "per message (publish + delivery), median of rounds: the client's CPU, and the "
        "wall clock's (with --window 1: one message's trip through the broker)"
    )
    for name, rounds in figures.items():
        cpu = [r.cpu * 1e6 for r in rounds]
        wall = [r.wall * 1e6 for r in rounds]
        print(f"  {name:14s} CPU {statistics.median(cpu):7.1f} us  wall "
              f"{statistics.median(wall):7.1f} us  (rounds, CPU/wall: "
              + ", ".join(f"{c:.1f}/{w:.1f}" for c, w in zip(cpu, wall, strict=True))
              + ")")  # fmt: skip


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
