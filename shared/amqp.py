"""RabbitMQ topology, declared in one place by every process that needs it.

- ``<ns>.jobs``: a durable classic queue of transient jobs. A job lives only
  as long as its caller waits on a live connection, so it is not written to
  disk: a quorum queue cost several times RabbitMQ's CPU per request and
  added latency (figures in docs/performance.md), for a durability nobody
  could use (after a broker restart no gateway still holds the caller);
  ``jobs_queue_type = "quorum"`` is there for clusters where a node's loss must
  not lose queued jobs. Each job expires at its deadline (the message's
  ``expiration``), so jobs nobody waits for do not fill it. ``x-max-length``
  with ``reject-publish`` makes a full queue answer the gateway's publish with
  a nack (seen only with publisher confirms).
- Classic queues count no deliveries, so the workers do: a job carries its
  attempt in ``x-botline-attempt``; a worker that is given a *redelivered*
  job (its last holder died) publishes a copy with the attempt raised and
  acks the old one. After a second death the copy goes to
  ``<ns>.jobs.suspect``, of which each worker holds one at a time
  (prefetch 1): only a death there implicates the job alone, and only such
  a death, past ``jobs_delivery_limit`` deaths, dead-letters the job
  (services/worker/worker.py).
- ``<ns>.jobs.dlx``: a headers exchange for dead jobs. Each gateway binds its
  reply queue on its own ``x-botline-gateway`` header, so the caller hears of
  the failure at once; ``<ns>.jobs.dead`` keeps a bounded copy for operators.
- ``<ns>.control``: a fanout exchange carrying cancellations to every worker.
- ``<ns>.replies``: a direct exchange for events, each gateway's reply queue
  bound on its own name. Its alternate exchange ``<ns>.replies.unroutable``
  (fanout, bound by every worker's control queue) catches events whose
  gateway is gone, so the worker running that job stops it. This needs no
  ``mandatory`` flag and no publisher confirms on the hot delta path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.commands import Basic

from shared import amqp_frames
from shared.priority import MAX_PRIORITY
from shared.settings import CommonSettings
from shared.tasks import cancelling, idle, stop

log = structlog.get_logger("botline.amqp")

# Header naming the gateway that owns a job; dead jobs are routed back on it.
GATEWAY_HEADER = "x-botline-gateway"
# The job's attempt (1 + redeliveries so far), kept by the workers.
ATTEMPT_HEADER = "x-botline-attempt"
# Set on a dead-lettered job: why it was given up.
DEAD_HEADER = "x-botline-dead"


_MISMATCH = (
    "RabbitMQ refused a declaration: a queue of this namespace exists with other "
    "arguments (after an upgrade, or another JOBS_MAX_LENGTH, JOBS_QUEUE_TYPE or "
    "JOBS_PRIORITIES): give every process the same settings, or stop them and delete "
    "the queue (rabbitmqctl delete_queue <namespace>.jobs)"
)


class TopologyMismatch(RuntimeError):
    """The broker refused our queues' arguments; retrying cannot help."""


class AmqpLink:
    """One supervised AMQP connection over a list of broker URLs, tried in turn.

    aio-pika's ``connect_robust`` reconnects to one URL only, and its restored
    consumers and publishes during an outage have a long bug history
    (FIELD-NOTES trap 9). This is the small, tested alternative: connect to a
    URL, run the owner's ``setup`` (declare the topology, open channels, start
    consumers) and report the link up; when the connection or any channel it
    watches closes, report it down at once (``on_lost``), then connect to the
    next URL and run ``setup`` again. A node reached after a failover gets the
    topology redeclared, so the nodes need not be clustered.

    ``up`` is true only while a connection is open *and* its ``setup``
    finished: a gateway is ready only when its reply queue consumes again.
    """

    def __init__(
        self,
        settings: CommonSettings,
        name: str,
        setup: Callable[[AbstractConnection], Awaitable[None]],
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._name = name
        self._urls = settings.amqp_urls
        self._setup = setup
        self._on_lost = on_lost
        self._connection: AbstractConnection | None = None
        self._node = 0  # index in _urls of the node connected to (or tried next)
        self._up = asyncio.Event()
        # Set when the broker refused our topology before we were ever up: retrying
        # cannot help, so start() fails at once with it.
        self._refused: TopologyMismatch | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._closing = False
        # Counts connections opened; callbacks carry theirs (see _live).
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        """Connected, with the owner's setup done on this connection."""
        return self._up.is_set() and self._refused is None

    @property
    def node(self) -> int:
        """The index of the broker URL in use (or to be tried next)."""
        return self._node

    async def start(self) -> None:
        """Connect (trying each URL in turn until ``startup_timeout_s``), then supervise.

        Raises ``TimeoutError`` when no broker could be reached in time.
        """
        self._task = asyncio.create_task(self._supervise(), name=f"amqp-link-{self._name}")
        try:
            async with asyncio.timeout(self._settings.startup_timeout_s):
                await self._up.wait()
            if self._refused is not None:
                raise self._refused
        except BaseException:
            await self.close()
            raise

    def watch(self, channel: AbstractChannel) -> AbstractChannel:
        """Treat ``channel`` closing (a broker-side channel error) as losing the link."""
        channel.close_callbacks.add(functools.partial(self._channel_closed, self._generation))
        return channel

    async def close(self) -> None:
        """Stop supervising and close the connection."""
        self._closing = True
        self._up.clear()
        if self._task is not None:
            await stop([self._task])
            self._task = None
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError):
                await connection.close()

    def _live(self, generation: int) -> bool:
        # Only the connection in use can be lost: a late callback of an earlier
        # one (closed meanwhile, replaced) must not take the new one down.
        return not self._closing and generation == self._generation and self._up.is_set()

    def _channel_closed(self, generation: int, channel: object, exc: BaseException | None) -> None:
        if not self._live(generation):
            return
        # The supervisor closes the connection too: setup() is rerun on a fresh one.
        log.warning("amqp.channel_closed", link=self._name, error=type(exc).__name__)
        self._mark_lost()

    def _connection_closed(
        self, generation: int, connection: object, exc: BaseException | None
    ) -> None:
        if not self._live(generation):
            return
        log.warning("amqp.connection_lost", link=self._name, error=type(exc).__name__)
        self._mark_lost()

    def _mark_lost(self) -> None:
        # Down first, then tell the owner: nothing new is accepted while it fails what it holds.
        self._up.clear()
        self._lost.set()
        if self._on_lost is not None:
            self._on_lost()

    async def _open(self, url: str) -> AbstractConnection:
        """Connect to one URL and run the owner's setup on it, within the connect timeout."""
        self._generation += 1
        amqp_frames.install()  # aiormq, with the frames of our messages coded by us
        connection = await aio_pika.connect(
            url,
            heartbeat=self._settings.amqp_heartbeat_s,
            timeout=self._settings.amqp_connect_timeout_s,
            client_properties={"connection_name": self._name},
        )
        try:
            async with asyncio.timeout(self._settings.amqp_connect_timeout_s):
                await self._setup(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def _supervise(self) -> None:
        delay = _RETRY_MIN_S
        failures = 0
        while True:
            if cancelling():  # lost inside a connect attempt (shared/tasks.py)
                raise asyncio.CancelledError
            url = self._urls[self._node]
            try:
                connection = await self._open(url)
            except (AMQPError, ChannelInvalidStateError, OSError, TimeoutError) as exc:
                if isinstance(exc, ChannelPreconditionFailed) and not self._up.is_set():
                    # A queue or exchange exists with other arguments: nothing to wait for.
                    log.error("amqp.topology_mismatch", link=self._name, hint=_MISMATCH)
                    self._refused = TopologyMismatch(_MISMATCH)
                    self._up.set()
                    return
                if failures % 10 == 0:  # the first of an outage, then every tenth
                    log.warning(
                        "amqp.connect_failed",
                        link=self._name,
                        node=self._node,
                        attempts=failures + 1,
                        error=type(exc).__name__,
                    )
                self._node = (self._node + 1) % len(self._urls)
                failures += 1
                if failures % len(self._urls) == 0:
                    # Every node refused: wait a little before the next round.
                    await idle(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)
                continue
            delay, failures = _RETRY_MIN_S, 0
            self._connection = connection
            self._lost.clear()
            connection.close_callbacks.add(
                functools.partial(self._connection_closed, self._generation)
            )
            if connection.is_closed:  # closed before the callback was there
                self._lost.set()
            else:
                self._up.set()
                log.info("amqp.connected", link=self._name, node=self._node)
            await self._lost.wait()
            if not connection.is_closed:  # only a channel was closed
                with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError):
                    await connection.close()
            # The connection (or a channel) is gone: the next node first.
            self._node = (self._node + 1) % len(self._urls)


# Between rounds of failed connects over every URL: fast at first (a broker
# restarting is back within seconds), then no more than once a second.
_RETRY_MIN_S = 0.25
_RETRY_MAX_S = 1.0


async def publish(
    channel: AbstractChannel,
    body: bytes,
    *,
    routing_key: str,
    message_id: str | None,
    exchange: str = "",
    correlation_id: str | None = None,
    message_type: str | None = None,
    headers: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
    mandatory: bool = False,
    wait: bool = False,
    expiration_ms: int | None = None,
    priority: int | None = None,
) -> None:
    """Publish one transient JSON message on the channel's own connection.

    Below aio-pika (whose ``Message`` object was a large part of a publish's
    CPU) and below aiormq's ``basic_publish`` too (its lock, timers and pamqp
    objects): the frames, coded by ``amqp_frames``, go straight into the
    connection's write queue (docs/performance.md, fifth pass). On a
    confirming channel this waits for the broker's confirm and raises
    aiormq's ``DeliveryError`` (nack) or ``PublishError`` (returned), as
    aio-pika's ``Exchange.publish`` does.

    Without ``wait`` this returns once the message is queued for the
    connection's writer (or, on a confirming channel, once confirmed), not
    after the writer has drained it to the socket. ``wait=True`` is
    backpressure: the writer's queue is bounded, and a waiting publish
    returns once the writer drained the socket after it, holding no lock
    meanwhile, so other publishers on the channel do not queue behind that
    wait. Order on the connection is kept either way.
    ``expiration_ms`` is the per-message TTL: the broker discards the message
    unconsumed once it has waited that long. ``priority`` is the message's
    place on a priority queue (shared/priority.py).
    """
    # The concrete channel: ``wait`` is missing from aiormq's abstract one.
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    properties = Basic.Properties(
        content_type=content_type,
        delivery_mode=1,
        message_id=message_id,
        correlation_id=correlation_id,
        message_type=message_type,
        headers=headers,
        expiration=None if expiration_ms is None else str(max(expiration_ms, 1)),
        priority=priority,
    )
    message = Outgoing(body, properties, exchange, routing_key, mandatory)
    if raw.publisher_confirms:
        await _publish_confirmed(raw, message)
        return
    drained = raw.create_future() if wait else None
    if publish_now(raw, message, drained=drained):
        if drained is not None:
            await drained
    else:
        if drained is not None:
            drained.cancel()
        await raw.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=wait,
        )


def _random_id() -> str:
    """A random id, as aiormq makes message ids and consumer tags (a UUID4's hex)."""
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


class Outgoing(NamedTuple):
    """A message to publish, as ``basic_publish`` takes it."""

    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str
    mandatory: bool = False


def _frames(raw: aiormq.Channel, message: Outgoing) -> tuple[bytes, str]:
    """The message's frames on ``raw``, and its id: a random one if it has none
    (as ``basic_publish`` gives it)."""
    properties = message.properties
    if properties.message_id is None:
        properties.message_id = _random_id()
    frames = amqp_frames.publish_frames(
        raw.number,
        message.body,
        properties,
        exchange=message.exchange,
        routing_key=message.routing_key,
        mandatory=message.mandatory,
        max_content=raw.max_content_size,
    )
    return frames, properties.message_id


async def _publish_confirmed(raw: aiormq.Channel, message: Outgoing) -> None:
    """Publish on a confirming channel and wait for the broker's confirm.

    What aiormq's ``basic_publish`` does on such a channel, without its lock,
    timers and pamqp objects: the broker numbers a channel's publishes in the
    order they arrive, and a confirm (or a return, by message id) names that
    number. Here the number is taken in the same step as the frames enter the
    connection's write queue, the order the writer sends them in, so the two
    cannot disagree; no lock is needed as long as every publish on the channel
    comes this way (every one of botline's does: ``publish`` is the only one).
    Raises aiormq's ``DeliveryError`` on a nack, ``PublishError`` on a return
    (the channel raises on returns), the channel's close reason if it closes.
    """
    if raw.is_closed:
        raise ChannelInvalidStateError(f"{raw!r} closed")
    frames, message_id = _frames(raw, message)
    # Waits only while the queue is full; nothing is queued or numbered until it returns.
    await raw.write_queue.put(ChannelFrame(payload=frames, should_close=False))
    raw.delivery_tag += 1
    tag = raw.delivery_tag
    confirmation = raw.create_future()
    raw.confirmations[tag] = confirmation
    if message.mandatory:  # a return names the message by its id (aiormq's _on_return_frame)
        ids = raw.message_id_delivery_tag
        ids[message_id] = tag

        def forget(_: asyncio.Future[Any]) -> None:
            if ids.get(message_id) == tag:
                del ids[message_id]

        confirmation.add_done_callback(forget)
    await confirmation


def publish_now(
    raw: aiormq.Channel, message: Outgoing, *, drained: asyncio.Future[None] | None = None
) -> bool:
    """Queue a message for the connection's writer at once; False if it must wait.

    On a channel without confirms nothing is waited for: the frames go straight
    into the connection's write queue, as aiormq's ``basic_publish`` puts them
    there, without its lock, timers and pamqp objects. A publish holding that
    lock has its frames queued already, or waits for room in a full queue, where
    this fails too and its caller waits in ``basic_publish`` behind it; so one
    task's messages keep their order. ``drained``, if given, is set once the
    writer has drained the socket after these frames (``wait=True``'s
    backpressure), without holding a lock meanwhile.
    """
    if raw.publisher_confirms or raw.is_closed:
        return False
    frames, _ = _frames(raw, message)
    try:
        raw.write_queue.put_nowait(
            ChannelFrame(payload=frames, should_close=False, drain_future=drained)
        )
    except asyncio.QueueFull:
        return False
    return True


async def ack_delivery(raw: aiormq.Channel, delivery_tag: int) -> None:
    """Ack one delivery; returns once the writer has drained the socket after it.

    aiormq's ``basic_ack(wait=True)`` without its two coroutines, its pamqp
    frame object and the coding of a one-frame list: the frame goes into the
    connection's write queue as ``publish_now``'s do, so it joins the write of
    what is queued before it (a job's last event). It waits for room only while
    the queue is full, as ``basic_ack`` does. Raises
    ``ChannelInvalidStateError`` on a closed channel, and the channel's close
    reason if it closes before the write (its future store fails the wait).
    A channel whose close has begun refuses too, as ``basic_ack`` does: an
    ack written behind our own ``Channel.Close`` would reach a channel the
    broker no longer has, a connection error; the delivery comes back to the
    queue with the channel instead.
    """
    # aiormq's own flag (name-mangled) for a close begun: basic_ack checks it too.
    closing: asyncio.Event | None = getattr(raw, "_Channel__close_event", None)
    if raw.is_closed or (closing is not None and closing.is_set()):
        raise ChannelInvalidStateError(f"{raw!r} closed")
    drained = raw.create_future()
    item = ChannelFrame(
        payload=amqp_frames.ack_frame(raw.number, delivery_tag),
        should_close=False,
        drain_future=drained,
    )
    try:
        raw.write_queue.put_nowait(item)
    except asyncio.QueueFull:
        try:
            await raw.write_queue.put(item)
        except BaseException:
            drained.cancel()
            raise
    await drained


async def consume(
    channel: AbstractChannel | aiormq.Channel,
    queue: str,
    consumer: amqp_frames.Consumer,
    *,
    no_ack: bool = False,
) -> str:
    """Consume ``queue`` on ``channel``; returns the consumer tag.

    Through aiormq itself, not aio-pika (whose ``IncomingMessage`` and second task
    per message were a large part of a message's CPU), and each delivery handed to
    ``consumer`` as its last frame is read (``amqp_frames.Deliveries``), not through
    the channel's frame queue and reader: a coroutine consumer runs in a task of
    the channel's (closing the channel cancels it, as aiormq's own consumers), a
    plain function is called there and then. Run by a link's setup on every
    connection, so a new connection consumes again.
    """
    if isinstance(channel, aiormq.Channel):
        raw = channel
    else:
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    tag = f"ctag{raw.number}.{_random_id()}"
    # Registered before the broker knows the tag: none of its deliveries takes the queue.
    amqp_frames.Deliveries.of(raw).add(tag, consumer)

    async def through_aiormq(message: DeliveredMessage) -> None:
        # aiormq's own path, which none of this tag's deliveries should take.
        done = consumer(message)
        if done is not None:
            await done

    await raw.basic_consume(queue, through_aiormq, no_ack=no_ack, consumer_tag=tag)
    return tag


async def declare_jobs(channel: AbstractChannel, settings: CommonSettings) -> AbstractQueue:
    """Declare the jobs queue and its dead-letter path; returns the jobs queue."""
    names = settings.names
    dead = await channel.declare_exchange(
        names.dead_exchange, aio_pika.ExchangeType.HEADERS, durable=True
    )
    dead_queue = await channel.declare_queue(
        names.dead_queue,
        durable=True,
        arguments={"x-max-length": 1000, "x-message-ttl": 86_400_000},
    )
    # A headers binding without match arguments takes every message.
    await dead_queue.bind(dead, arguments={"x-match": "all"})
    arguments: dict[str, Any] = {
        "x-queue-type": settings.jobs_queue_type,
        "x-max-length": settings.jobs_max_length,
        "x-overflow": "reject-publish",
    }
    if settings.jobs_queue_type == "quorum":
        # A quorum queue counts deliveries itself and, past this, drops the
        # job. The workers' own count (x-botline-attempt: a redelivered job is
        # re-published with its attempt raised) buries it well before, with
        # its caller told; this limit is only a backstop for the same job
        # returned again and again without any worker re-publishing it.
        arguments["x-delivery-limit"] = settings.jobs_delivery_limit + 2
    elif settings.jobs_priorities:
        arguments["x-max-priority"] = MAX_PRIORITY
    await declare_suspects(channel, settings)
    return await channel.declare_queue(names.jobs_queue, durable=True, arguments=arguments)


async def declare_suspects(channel: AbstractChannel, settings: CommonSettings) -> AbstractQueue:
    """Declare the queue of jobs that died twice (services/worker/worker.py); returns it."""
    # Not bounded: it only ever holds jobs the jobs queue already admitted. Of the
    # jobs queue's type, so that a quorum setup loses no suspect with a node.
    return await channel.declare_queue(
        settings.names.suspect_queue,
        durable=True,
        arguments={"x-queue-type": settings.jobs_queue_type},
    )


async def declare_control(channel: AbstractChannel, settings: CommonSettings) -> AbstractExchange:
    """Declare the cancellation fanout exchange."""
    return await channel.declare_exchange(
        settings.names.control_exchange, aio_pika.ExchangeType.FANOUT, durable=False
    )


async def declare_replies(
    channel: AbstractChannel, settings: CommonSettings
) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare the events exchange and its alternate; returns (replies, unroutable)."""
    names = settings.names
    unroutable = await channel.declare_exchange(
        names.unroutable_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    replies = await channel.declare_exchange(
        names.reply_exchange,
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments={"alternate-exchange": names.unroutable_exchange},
    )
    return replies, unroutable


async def delete_namespace(channel: AbstractChannel, settings: CommonSettings) -> None:
    """Remove a namespace's shared queues and exchanges (tests, `botline` cleanup)."""
    names = settings.names
    for queue in (names.jobs_queue, names.suspect_queue, names.dead_queue):
        await channel.queue_delete(queue)
    exchanges = (
        names.dead_exchange,
        names.control_exchange,
        names.reply_exchange,
        names.unroutable_exchange,
    )
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
