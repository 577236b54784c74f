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
import secrets
import signal
import time
from collections import Counter, OrderedDict
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from services.worker.coalesce import coalesce
from services.worker.models import Finish, Model, make_model
from services.worker.probes import serve_probes
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
from shared.errors import BotlineError, DeadlineExceeded, InternalError, UnknownEndpoint
from shared.registry import now_ms
from shared.wire import CancelJob, ChatJob, DeltaEvent, EndEvent, ErrorEvent

log = structlog.get_logger("botline.worker")

# Cancellations remembered for jobs not (yet) seen here, so that a job
# cancelled while still queued is dropped when it arrives.
_REMEMBER_CANCELLED = 10_000


class _Events:
    """Publishes one attempt's events with a gap-free ``seq``."""

    def __init__(self, channel: AbstractChannel, exchange: str, job: ChatJob, attempt: int) -> None:
        self._channel = channel
        self._exchange = exchange
        self._job = job
        self._attempt = attempt
        self._seq = 0

    async def _send(self, event: DeltaEvent | EndEvent | ErrorEvent, *, wait: bool = False) -> None:
        job = self._job
        self._seq += 1
        # No mandatory flag: an event whose gateway is gone goes to the replies'
        # alternate exchange, which brings it back to the workers to stop the job.
        # Deltas do not wait for the socket (a first delta must not queue behind
        # other streams' writes); a job's last event does, as backpressure: a
        # worker whose broker stops reading stops finishing, and taking, jobs.
        await publish(
            self._channel,
            event.dump(),
            exchange=self._exchange,
            routing_key=job.reply_to,
            message_id=f"{job.job_id}.{self._attempt}.{event.seq}",
            correlation_id=job.job_id,
            message_type=event.type,
            wait=wait,
        )

    async def delta(self, text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        job = self._job
        await self._send(
            DeltaEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                text=text,
                tool_calls=tool_calls,
            )
        )

    async def end(self, text: str, finish: Finish) -> None:
        job = self._job
        await self._send(
            EndEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                text=text,
                finish_reason=finish.finish_reason,
                usage=finish.usage,
            ),
            wait=True,
        )

    async def error(self, error: BotlineError) -> None:
        job = self._job
        await self._send(
            ErrorEvent(
                job_id=job.job_id,
                attempt=self._attempt,
                seq=self._seq,
                code=error.code,
                message=error.message,
            ),
            wait=True,
        )


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A job message again, with some headers set."""
    return aio_pika.Message(
        message.body,
        headers={**message.headers, **headers},
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


class JobStats:
    """Counts of jobs by outcome (``done``, ``dropped``, error codes); awaitable."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    async def add(self, outcome: str) -> None:
        """Count one job."""
        async with self._changed:
            self.counts[outcome] += 1
            self._changed.notify_all()

    async def wait_for(self, outcome: str, count: int, timeout_s: float = 10.0) -> None:
        """Until ``count`` jobs ended with ``outcome``."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.counts[outcome] >= count)

    @property
    def total(self) -> int:
        """Jobs handled, whatever their outcome."""
        return sum(self.counts.values())


class Worker:
    """One worker process's connection, consumers and running jobs."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or secrets.token_hex(6)
        endpoints = settings.all_endpoints()
        self._models: dict[str, Model] = {name: make_model(cfg) for name, cfg in endpoints.items()}
        self._limits = {
            name: asyncio.Semaphore(cfg.max_concurrency) for name, cfg in endpoints.items()
        }
        self._running: dict[str, asyncio.Task[object]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._connection: AbstractRobustConnection | None = None
        self._jobs: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._events: AbstractChannel | None = None
        self._replies_exchange = settings.names.reply_exchange
        # Confirmed publishes for the rare paths that must not lose a job.
        self._confirmed: AbstractChannel | None = None
        self._dead: AbstractExchange | None = None
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
        self._dead = await self._confirmed.get_exchange(settings.names.dead_exchange, ensure=False)
        self._consumer_tag = await self._jobs.consume(self._on_job)
        log.info("worker.started", worker_id=self.worker_id, endpoints=sorted(self._models))

    def readiness(self) -> dict[str, bool]:
        """The probe's checks: connected to RabbitMQ, and taking jobs (not draining)."""
        connection, jobs = self._connection, self._jobs
        # A robust connection stays "open" while it reconnects: ask its transport.
        transport = None if connection is None else connection.transport
        return {
            "amqp": connection is not None
            and not connection.is_closed
            and transport is not None
            and not transport.connection.is_closed,
            "consuming": jobs is not None
            and self._consumer_tag is not None
            and not jobs.channel.is_closed,
        }

    async def stop(self) -> None:
        """Stop taking jobs, drain running ones, close."""
        if self._jobs is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            with contextlib.suppress(AMQPError, ChannelInvalidStateError):
                await self._jobs.cancel(tag)
        running = list(self._running.values())
        if running:
            log.info("worker.draining", jobs=len(running))
            _, late = await asyncio.wait(running, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for model in self._models.values():
            await model.close()
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
        try:
            job = ChatJob.model_validate_json(message.body)
        except ValidationError:
            log.error("wire.invalid_job")
            await self._bury(message, "invalid")
            return
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
            await self._retry(message, attempt + 1)
            return
        if dropped is not None:
            log.info("job.dropped", reason=dropped)
            await self._ack(message)
            await self.stats.add("dropped")
            return
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
        await self._ack(message)

    async def _retry(self, message: AbstractIncomingMessage, attempt: int) -> None:
        """Put a redelivered job back with its attempt counted, or bury it past the limit."""
        if attempt > self.settings.jobs_delivery_limit + 1:
            log.warning("job.dead", reason="delivery_limit")
            await self._bury(message, "delivery_limit")
            return
        assert self._confirmed is not None
        copy = _copy(message, {ATTEMPT_HEADER: attempt})
        try:
            await self._confirmed.default_exchange.publish(
                copy, routing_key=self.settings.names.jobs_queue, mandatory=True
            )
        except (AMQPError, ChannelInvalidStateError) as exc:
            # Not re-queued with its count: leave it to RabbitMQ to hand out again.
            log.warning("job.retry_failed", error=type(exc).__name__)
            await message.nack(requeue=True)
            return
        log.info("job.retried", next_attempt=attempt)
        await self._ack(message)

    async def _bury(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter a job: its gateway is told at once, operators keep a copy."""
        assert self._dead is not None
        try:
            await self._dead.publish(_copy(message, {DEAD_HEADER: reason}), routing_key="")
        except (AMQPError, ChannelInvalidStateError) as exc:
            log.warning("job.bury_failed", error=type(exc).__name__)
        await self._ack(message)

    def _stream_window(self) -> float:
        """The coalescing window of a stream: wider when many streams share this worker.

        Every event costs the worker, RabbitMQ and the gateway a fixed amount
        of CPU whatever it carries, so the total rate is held near
        ``events_per_s``: with few streams each gets the base window, with
        many each gets a share of the budget (and larger, rarer deltas).
        """
        settings = self.settings
        return max(settings.coalesce_ms / 1000, len(self._running) / settings.events_per_s)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (AMQPError, ChannelInvalidStateError):
            # The channel died meanwhile; RabbitMQ redelivers the job.
            log.warning("job.ack_failed")

    async def _run(self, job: ChatJob, attempt: int) -> None:
        assert self._events is not None
        events = _Events(self._events, self._replies_exchange, job, attempt)
        model = self._models.get(job.endpoint)
        if model is None:
            await events.error(UnknownEndpoint(f"no model endpoint named {job.endpoint!r}"))
            return
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (job.deadline_ms - now_ms()) / 1000
        outcome = "done"
        try:
            async with asyncio.timeout_at(deadline) as window, self._limits[job.endpoint]:
                settings = self.settings
                await coalesce(
                    model.stream(job),
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
            endpoint=job.endpoint,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )


async def serve(settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain."""
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Probes first: /livez answers (and /readyz says 503) while the broker is still being reached.
    async with serve_probes(settings, worker):
        await worker.start()
        try:
            await stop.wait()
        finally:
            await worker.stop()
