"""The gateway's side of RabbitMQ: publish jobs, receive their events, cancel them.

One connection and one exclusive reply queue per gateway process; each
event is routed to the waiting request by its correlation id (the job id).
Jobs are published with publisher confirms and ``mandatory``: a full queue
answers with a nack and a missing queue with a return, and both must reach
the caller as a 503 instead of a job silently lost. Each job carries its
remaining deadline as the message's ``expiration``, so a job nobody waits
for any more leaves the queue by itself.

The connection is a supervised :class:`shared.amqp.AmqpLink`. When it is
lost, every job in flight fails at once (its events could only have come on
that connection's reply queue, which is gone) and new jobs are refused until
the link is up again, reply queue consuming, on this or another broker node.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from shared.amqp import (
    DEAD_HEADER,
    GATEWAY_HEADER,
    AmqpLink,
    consume,
    declare_control,
    declare_jobs,
    declare_replies,
    publish,
)
from shared.clock import now_ms
from shared.errors import BackendUnavailable, BotlineError, Overloaded
from shared.tasks import TaskSet
from shared.wire import (
    BeatEvent,
    CancelJob,
    ChatJob,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    decode_event,
)

log = structlog.get_logger("botline.gateway.job_client")


class DeadJob:
    """Marks a job that RabbitMQ dead-lettered after too many failed deliveries."""


class LostConnection:
    """Marks a job whose events can no longer come: the broker connection was lost."""


class Started:
    """Marks a job a worker took from the queue (its first beat or event)."""


DEAD: Final = DeadJob()
LOST: Final = LostConnection()
STARTED: Final = Started()
# The drain rate is measured over this window.
DRAIN_WINDOW_S: Final = 10.0
RETRY_AFTER_MAX_S: Final = 300


@dataclass(frozen=True, slots=True)
class Interrupted:
    """Ends a job's events with an error of the gateway's own (its key was revoked, say)."""

    error: BotlineError


_BEAT: Final = BeatEvent.model_fields["type"].default
Incoming = DeltaEvent | EndEvent | ErrorEvent | DeadJob | LostConnection | Interrupted | Started


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


class Inbox:
    """One job's events in arrival order: ``put_nowait`` and ``get`` as an ``asyncio.Queue``'s,
    for one reader at a time.

    A queue per job in flight, so it is kept small: a list, and a future only while its
    reader waits (``asyncio.Queue`` holds four deques, about 1.6 KiB, and costs more per
    event). An event taken by a ``get`` that is cancelled stays for the next one.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Incoming] = []
        # Its result: whether the timer woke it (True) rather than an event.
        self._waiter: asyncio.Future[bool] | None = None

    def put_nowait(self, item: Incoming) -> None:
        """Add an event; wakes the reader."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    async def get(self, timeout_s: float | None = None) -> Incoming:
        """The next event, waiting for one if none is there; ``TimeoutError`` if none
        came within ``timeout_s``.

        The timeout is a timer on the wait itself, not ``asyncio.timeout``, which
        costs 2-3x as much per wait (docs/performance.md, ninth pass). An event
        that arrives before this reader runs again is returned, even if the timer
        fired meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._items:
            # A waiter left by a cancelled reader is done already (cancelling a task
            # cancels the future it awaits) though that reader has not yet run.
            assert self._waiter is None or self._waiter.done(), "one reader at a time"
            if deadline is not None and deadline <= loop.time():
                raise TimeoutError
            waiter = self._waiter = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                expired = await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if self._waiter is waiter:
                    self._waiter = None
            if expired and not self._items:
                raise TimeoutError
        return self._items.pop(0)

    def empty(self) -> bool:
        """Whether no event is waiting."""
        return not self._items


class Drain:
    """How fast this gateway's jobs leave the queue: starts per second over a window."""

    def __init__(self, window_s: float = DRAIN_WINDOW_S) -> None:
        self._window_s = window_s
        self._starts: deque[float] = deque()

    def started(self) -> None:
        """A job of ours was taken by a worker now."""
        now = time.monotonic()
        self._starts.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._starts and self._starts[0] < now - self._window_s:
            self._starts.popleft()

    def rate(self) -> float:
        """Jobs started per second, over the last window."""
        self._trim(time.monotonic())
        return len(self._starts) / self._window_s

    def retry_after(self, waiting: int, default_s: float) -> int:
        """Seconds until ``waiting`` jobs have drained at the measured rate.

        ``default_s`` when nothing drained in the window (no rate to go by).
        """
        rate = self.rate()
        seconds = waiting / rate if rate > 0 else default_s
        return max(1, min(math.ceil(seconds), RETRY_AFTER_MAX_S))


class JobClient:
    """Owns this gateway's AMQP connection, reply queue and in-flight jobs."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or secrets.token_hex(6)
        self.reply_queue_name = settings.names.reply_queue(self.gateway_id)
        self._pending: dict[str, Inbox] = {}
        # Pending jobs a worker has taken; the others wait in the queue.
        self._started: set[str] = set()
        self.drain = Drain()
        self._tasks = TaskSet()
        self._link = AmqpLink(
            settings, f"gateway-{self.gateway_id}", setup=self._setup, on_lost=self._fail_pending
        )
        self._publish: AbstractChannel | None = None

    async def start(self) -> None:
        """Connect (retrying until ``startup_timeout_s``) and declare what we use."""
        await self._link.start()

    async def _setup(self, connection: AbstractConnection) -> None:
        """Declare the topology and consume the reply queue; run on every (re)connect."""
        publish = self._link.watch(
            await connection.channel(publisher_confirms=True, on_return_raises=True)
        )
        await declare_jobs(publish, self.settings)
        await declare_control(publish, self.settings)
        replies_exchange, _ = await declare_replies(publish, self.settings)
        replies = self._link.watch(await connection.channel(publisher_confirms=False))
        reply_queue = await replies.declare_queue(
            self.reply_queue_name, exclusive=True, auto_delete=True
        )
        await reply_queue.bind(replies_exchange, routing_key=self.reply_queue_name)
        # Jobs dead-lettered after too many deliveries come back to their gateway.
        await reply_queue.bind(
            self.settings.names.dead_exchange,
            arguments={"x-match": "all", GATEWAY_HEADER: self.gateway_id},
        )
        # Each event handed over as it is read, no task (shared/amqp.consume).
        await consume(replies, self.reply_queue_name, self._on_reply, no_ack=True)
        self._publish = publish
        log.info("amqp.ready", reply_queue=self.reply_queue_name, node=self._link.node)

    def _fail_pending(self) -> None:
        """The connection is gone, and with it every event still to come: fail all jobs now."""
        self._publish = None
        for queue in self._pending.values():
            queue.put_nowait(LOST)
        if self._pending:
            log.warning("amqp.jobs_failed", jobs=len(self._pending))

    async def close(self) -> None:
        """Finish pending cancellations, then close the connection."""
        await self._tasks.close()
        await self._link.close()

    @property
    def ready(self) -> bool:
        """Connected, with the topology declared and the reply queue consuming."""
        return self._link.up and self._publish is not None

    def register(self, job_id: str) -> Inbox:
        """Start routing a job's events to the returned inbox."""
        inbox = self._pending[job_id] = Inbox()
        return inbox

    def forget(self, job_id: str) -> None:
        """Stop routing a job's events; later ones are dropped."""
        self._pending.pop(job_id, None)
        self._started.discard(job_id)

    @property
    def waiting(self) -> int:
        """This gateway's jobs still waiting in the queue for a worker."""
        return len(self._pending) - len(self._started)

    def _start(self, job_id: str, queue: Inbox) -> None:
        if job_id not in self._started:
            self._started.add(job_id)
            self.drain.started()
            queue.put_nowait(STARTED)

    async def submit(self, job: ChatJob, priority: int | None = None) -> None:
        """Publish a job and wait for the broker's confirm; refused at once while disconnected.

        ``priority`` is its message priority (shared/priority.py).
        """
        channel = self._publish
        if channel is None or not self._link.up:
            raise BackendUnavailable("the job queue is unreachable")
        try:
            async with asyncio.timeout(self.settings.publish_timeout_s):
                # Transient: see shared/amqp.py for why jobs are not written to disk.
                await publish(
                    channel,
                    job.dump(),
                    routing_key=self.settings.names.jobs_queue,
                    message_id=job.job_id,
                    correlation_id=job.job_id,
                    message_type=job.type,
                    headers={GATEWAY_HEADER: self.gateway_id},
                    mandatory=True,
                    # Past its deadline nobody waits for it: the broker drops it.
                    # Past its wait in the queue, its gateway refuses it.
                    expiration_ms=min(job.deadline_ms, job.wait_until_ms or job.deadline_ms)
                    - now_ms(),
                    priority=priority,
                )
        except PublishError as exc:
            raise BackendUnavailable("the job queue does not exist") from exc
        except DeliveryError as exc:
            # A nack: with x-overflow=reject-publish, the queue is full.
            raise Overloaded("too many requests are waiting; try again shortly") from exc
        except (AMQPError, ChannelInvalidStateError, OSError, TimeoutError) as exc:
            raise BackendUnavailable("the job queue is unreachable") from exc

    def cancel(self, job_id: str) -> None:
        """Tell the workers to stop a job; returns at once (safe while being cancelled)."""
        self._tasks.spawn(self._send_cancel(job_id))

    async def _send_cancel(self, job_id: str) -> None:
        channel = self._publish
        if channel is None or not self._link.up:
            return
        with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError, TimeoutError):
            async with asyncio.timeout(self.settings.publish_timeout_s):
                cancel = CancelJob(job_id=job_id)
                await publish(
                    channel,
                    cancel.dump(),
                    exchange=self.settings.names.control_exchange,
                    routing_key="",
                    message_id=f"cancel.{job_id}",
                    message_type=cancel.type,
                )

    def _on_reply(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        job_id = properties.correlation_id or ""
        queue = self._pending.get(job_id)
        if queue is None:
            return  # the caller is gone; late events are expected
        dead = bool(properties.headers and properties.headers.get(DEAD_HEADER))
        if properties.message_type == _BEAT:
            # A whole answer's sign of life (for the worker's sake, shared/wire.py),
            # and a job's first word: it has left the queue.
            self._start(job_id, queue)
            return
        if job_id not in self._started and not dead:
            self._start(job_id, queue)
        if dead:
            queue.put_nowait(DEAD)
            return
        try:
            event = decode_event(message.body)
        except ValidationError:
            log.warning("wire.invalid_event", message_type=properties.message_type)
            return
        queue.put_nowait(event)
