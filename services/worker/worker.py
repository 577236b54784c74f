"""The worker: takes chat jobs from RabbitMQ, calls models, streams events back.

Acknowledgement policy: a job is acked when its terminal event (end or
error) has been published, or when it is dropped on purpose (its deadline
passed while queued, or it was cancelled). A worker that dies holding a job
leaves it unacked, and RabbitMQ gives it to another worker, flagged
``redelivered``. That worker counts the attempt: it publishes a copy with
the attempt raised (or, past the limit, dead-letters it) and acks the
original, so the count survives further deaths (see shared/amqp.py).

SIGTERM: stop taking jobs, let running ones finish within
``drain_timeout_s``, cancel the rest (they are redelivered), exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from services.worker.coalesce import coalesce
from services.worker.endpoints import Model, make_model
from services.worker.job_events import JobEvents, JobStats
from services.worker.routing import Router
from services.worker.settings import WorkerSettings
from shared.amqp import (
    ATTEMPT_HEADER,
    DEAD_HEADER,
    connect,
    declare_control,
    declare_jobs,
    declare_replies,
    publish,
)
from shared.clock import now_ms
from shared.errors import BotlineError, DeadlineExceeded, InternalError
from shared.wire import CancelJob, ChatJob

log = structlog.get_logger("botline.worker")

# Cancellations remembered for jobs not (yet) seen here, so that a job
# cancelled while still queued is dropped when it arrives.
_REMEMBER_CANCELLED = 10_000


def stream_window(settings: WorkerSettings, streams: int) -> float:
    """The coalescing window of a stream: wider when many streams share this worker.

    Every event costs the worker, RabbitMQ and the gateway a fixed amount
    of CPU whatever it carries, so the total rate is held near
    ``events_per_s``: with few streams each gets the base window, with
    many each gets a share of the budget (and larger, rarer deltas).
    """
    return max(settings.coalesce_ms / 1000, streams / settings.events_per_s)


class Action(enum.Enum):
    """What becomes of a job message."""

    ACK = "ack"  # answered, or dropped on purpose
    RETRY = "retry"  # redelivered: a copy with the attempt counted is queued, this one acked
    BURY = "bury"  # dead-lettered with a reason, then acked


@dataclass(frozen=True, slots=True)
class Disposition:
    """A job message's fate, decided once by :meth:`Worker._handle`."""

    action: Action
    reason: str = ""  # BURY: why, in the dead header
    attempt: int = 0  # RETRY: the attempt the copy carries
    count: str | None = None  # an outcome to count once the message is settled


class Worker:
    """One worker process's connection, consumers and running jobs."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or secrets.token_hex(6)
        endpoints = settings.all_endpoints()
        self._models: dict[str, Model] = {name: make_model(cfg) for name, cfg in endpoints.items()}
        # Which endpoint answers each job: fallbacks, fleet cooldowns and budgets.
        self.router = Router(settings, self._models, endpoints)
        self._running: dict[str, asyncio.Task[object]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._connection: AbstractRobustConnection | None = None
        self._jobs: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._events: AbstractChannel | None = None
        self._replies_exchange = settings.names.reply_exchange
        # Confirmed publishes for the rare paths that must not lose a job.
        self._confirmed: AbstractChannel | None = None
        self.stats = JobStats()

    async def start(self) -> None:
        """Connect, declare, and start consuming jobs and cancellations."""
        settings = self.settings
        connection = await connect(settings, f"worker-{self.worker_id}")
        self._connection = connection
        jobs_channel = await connection.channel()
        await jobs_channel.set_qos(prefetch_count=settings.concurrency)
        self._jobs = await declare_jobs(jobs_channel, settings)
        control = await declare_control(jobs_channel, settings)
        control_queue = await jobs_channel.declare_queue(
            settings.names.control_queue(self.worker_id), exclusive=True, auto_delete=True
        )
        await control_queue.bind(control)
        _, unroutable = await declare_replies(jobs_channel, settings)
        await control_queue.bind(unroutable)
        await control_queue.consume(self._on_control, no_ack=True)
        # Deltas need no confirms: a lost worker is handled by redelivery and
        # the gateway's fencing, and confirms per delta would halve throughput.
        self._events = await connection.channel(publisher_confirms=False)
        self._confirmed = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.router.start()
        self._consumer_tag = await self._jobs.consume(self._on_job)
        log.info("worker.started", worker_id=self.worker_id, endpoints=sorted(self._models))

    async def stop(self) -> None:
        """Stop taking jobs, drain running ones, close."""
        if self._jobs is not None and self._consumer_tag is not None:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError):
                await self._jobs.cancel(self._consumer_tag)
        running = list(self._running.values())
        if running:
            log.info("worker.draining", jobs=len(running))
            _, late = await asyncio.wait(running, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.router.close()
        if self._connection is not None:
            await self._connection.close()
        log.info("worker.stopped", jobs=self.stats.total)

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        # Either a cancellation, or an event that found no reply queue: its
        # gateway is gone and nobody waits for the job any more.
        if message.type == CancelJob.model_fields["type"].default:
            try:
                self._cancel(CancelJob.model_validate_json(message.body).job_id)
            except ValidationError:
                log.warning("wire.invalid_control")
        elif message.correlation_id and message.correlation_id in self._running:
            log.info("job.orphaned")
            self._cancel(message.correlation_id)

    def _cancel(self, job_id: str) -> None:
        self._cancelled[job_id] = None
        if len(self._cancelled) > _REMEMBER_CANCELLED:
            self._cancelled.popitem(last=False)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()

    async def _on_job(self, message: AbstractIncomingMessage) -> None:
        disposition = await self._handle(message)
        await self._dispose(message, disposition)

    async def _handle(self, message: AbstractIncomingMessage) -> Disposition:
        """Run a job, or decide not to; returns what becomes of its message.

        Raises (leaving the message unacked, so another worker takes it) only
        when this worker shuts down mid-job.
        """
        try:
            job = ChatJob.model_validate_json(message.body)
        except ValidationError:
            log.error("wire.invalid_job")
            return Disposition(Action.BURY, reason="invalid")
        counted = message.headers.get(ATTEMPT_HEADER)
        attempt = counted if isinstance(counted, int) else 1
        structlog.contextvars.bind_contextvars(
            request_id=job.request_id, job_id=job.job_id, attempt=attempt
        )
        if job.job_id in self._cancelled:
            dropped = "cancelled"
        elif job.deadline_ms <= now_ms():
            dropped = "deadline"
        else:
            dropped = None
        if message.redelivered and dropped is None:
            # Its last holder died: count that attempt where the next one will see it.
            if attempt + 1 > self.settings.jobs_delivery_limit + 1:
                log.warning("job.dead", reason="delivery_limit")
                return Disposition(Action.BURY, reason="delivery_limit")
            return Disposition(Action.RETRY, attempt=attempt + 1)
        if dropped is not None:
            log.info("job.dropped", reason=dropped)
            return Disposition(Action.ACK, count="dropped")
        task = asyncio.current_task()
        assert task is not None
        self._running[job.job_id] = task
        try:
            await self._run(job, attempt)
        except asyncio.CancelledError:
            if job.job_id not in self._cancelled:
                raise  # shutting down: leave it unacked, another worker takes it
            task.uncancel()
            log.info("job.cancelled")
            await self.stats.add("cancelled")
        finally:
            self._running.pop(job.job_id, None)
        return Disposition(Action.ACK)

    async def _dispose(self, message: AbstractIncomingMessage, disposition: Disposition) -> None:
        """The one place a job message is settled with RabbitMQ."""
        if disposition.action is not Action.ACK:
            # A retry is queued again with its attempt counted; a buried job is
            # dead-lettered: its gateway is told at once, operators keep a copy.
            # Both on the confirming channel, so a lost copy is known.
            retry = disposition.action is Action.RETRY
            names = self.settings.names
            mark = (
                {ATTEMPT_HEADER: disposition.attempt}
                if retry
                else {DEAD_HEADER: disposition.reason}
            )
            assert self._confirmed is not None
            try:
                await publish(
                    self._confirmed,
                    message.body,
                    exchange="" if retry else names.dead_exchange,
                    routing_key=names.jobs_queue if retry else "",
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    content_type=message.content_type,
                    headers={**message.headers, **mark},
                    mandatory=retry,
                )
            except (AMQPError, ChannelInvalidStateError) as exc:
                if retry:
                    # Not re-queued with its count: leave it to RabbitMQ to hand out again.
                    log.warning("job.retry_failed", error=type(exc).__name__)
                    await message.nack(requeue=True)
                    return
                log.warning("job.bury_failed", error=type(exc).__name__)
            else:
                if retry:
                    log.info("job.retried", next_attempt=disposition.attempt)
        try:
            await message.ack()
        except (AMQPError, ChannelInvalidStateError):
            # The channel died meanwhile; RabbitMQ redelivers the job.
            log.warning("job.ack_failed")
        if disposition.count is not None:
            await self.stats.add(disposition.count)

    def _stream_window(self) -> float:
        return stream_window(self.settings, len(self._running))

    async def _run(self, job: ChatJob, attempt: int) -> None:
        assert self._events is not None
        events = JobEvents(self._events, self._replies_exchange, job, attempt)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (job.deadline_ms - now_ms()) / 1000
        outcome = "done"
        try:
            async with asyncio.timeout_at(deadline) as window:
                settings = self.settings
                await coalesce(
                    self.router.stream(job, events.answered_by),
                    events.delta,
                    events.end,
                    window_s=self._stream_window if job.stream else settings.whole_window_ms / 1000,
                    max_chars=settings.coalesce_chars if job.stream else settings.whole_chars,
                    first_at_once=job.stream,
                )
        except TimeoutError:
            if not window.expired():
                raise
            outcome = "deadline"
            await events.error(DeadlineExceeded("the request deadline passed"))
        except BotlineError as exc:
            outcome = exc.code
            await events.error(exc)
        except (AMQPError, ChannelInvalidStateError):
            raise
        except Exception:
            outcome = "internal_error"
            log.exception("job.crashed")
            await events.error(InternalError("the worker failed on this request"))
        await self.stats.add(outcome)
        log.info(
            "job.finished",
            outcome=outcome,
            endpoint=events.endpoint or job.endpoint,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )


async def serve(settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain."""
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    beat = asyncio.create_task(_health_beat(settings))
    try:
        await stop.wait()
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        await worker.stop()


async def _health_beat(settings: WorkerSettings) -> None:
    if settings.health_file is None:
        return
    while True:
        settings.health_file.touch()
        await asyncio.sleep(5)
