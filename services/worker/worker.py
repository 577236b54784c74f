"""The worker: takes chat jobs from RabbitMQ, calls models, streams events back.

Acknowledgement policy: a job is acked when its terminal event (end or
error) has been published (queued right behind it, the two leave in one
write, before the job's metrics and log line: those are off the caller's
path), or when it is dropped on purpose (its deadline
passed while queued, it was cancelled, or its gateway closed it). A worker
that dies holding jobs leaves them unacked, and RabbitMQ gives them to
another worker, flagged ``redelivered``.

Poison jobs, and the innocent ones beside them. A worker holds up to
``concurrency`` jobs, and when it dies all of them come back: the job that
killed it cannot be told from the others, so a death is never blamed on a
job that did not die alone. The worker given a redelivered job publishes a
copy with its attempt raised (for the gateway's fencing, and as the count of
deaths) and acks the original. After one death the copy goes back to the
jobs queue and runs at once, as before (a random crash costs nothing more).
After a second death it goes to ``<ns>.jobs.suspect`` instead. Every worker
consumes suspects on a channel of their own with a prefetch of one, so it
holds at most one suspect at a time, beside its ordinary jobs: a worker that
dies holding a suspect implicates that one job alone. Only such a death, in
isolation, can bury a job: past ``jobs_delivery_limit`` deaths, the last of
them as a suspect, the job is dead-lettered (its gateway hears
``job_failed`` at once) instead of run again. Innocent jobs that died beside
a poison job, even twice, run again as suspects and complete. (A suspect
shares its worker with ordinary jobs, so a *new* poison job's first runs
could still strike it; it takes several such deaths to bury it.)

A job is never started again for a caller who no longer waits for it:
before a job runs again (a redelivery, or a suspect), the worker checks the
closed marker its gateway sets when it gives up on a job (answered with an
error, caller gone), and drops the job if it is there. That is the only
Redis call a worker makes, and only on that rare path. A worker that loses
its AMQP connection (a broker restart, or it was frozen past the heartbeat
and dropped) cancels its running jobs: their events and acks can no longer
land, and RabbitMQ has already given them to another worker, or will.

A whole answer sends a small beat event every ``beat_ms`` while it runs:
if its gateway is gone the beat finds no reply queue and bounces back
through the replies' alternate exchange, which stops the job (as a
stream's next delta does).

SIGTERM: stop taking jobs, let running ones finish within
``drain_timeout_s``, cancel the rest (they are redelivered), exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.metadata
import secrets
import signal
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.worker.coalesce import coalesce
from services.worker.endpoints import Model, make_model
from services.worker.job_events import JobEvents, JobStats
from services.worker.metrics import UNKNOWN, WorkerMetrics
from services.worker.probes import serve_probes
from services.worker.routing import Router
from services.worker.settings import WorkerSettings
from shared import fleet
from shared.amqp import (
    ATTEMPT_HEADER,
    DEAD_HEADER,
    AmqpLink,
    ack_delivery,
    consume,
    declare_control,
    declare_jobs,
    declare_replies,
    declare_suspects,
    publish,
)
from shared.clock import now_ms
from shared.errors import (
    BotlineError,
    DeadlineExceeded,
    InternalError,
    UpstreamError,
)
from shared.loop import settle_heap, watch_lag
from shared.redis_client import redis_client
from shared.tasks import stop
from shared.wire import CancelJob, ChatJob

log = structlog.get_logger("botline.worker")

try:
    _VERSION = importlib.metadata.version("botline")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    _VERSION = "unknown"

# The longest a broker call may take while stopping.
_STOP_CALL_S = 5.0

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
    RETRY = "retry"  # redelivered: a copy with its attempt raised is queued, this one acked
    BURY = "bury"  # dead-lettered with a reason, then acked
    LEAVE = "leave"  # the connection is gone: nothing can be settled, RabbitMQ redelivers


@dataclass(frozen=True, slots=True)
class Disposition:
    """A job message's fate, decided once by :meth:`Worker._handle`."""

    action: Action
    reason: str = ""  # BURY: why, in the dead header
    attempt: int = 0  # RETRY: the attempt the copy carries
    suspect: bool = False  # RETRY: the copy goes to the suspect queue
    deadline_ms: int = 0  # RETRY: the job's deadline, the copy's expiry as the original's
    count: str | None = None  # an outcome to count once the message is settled
    endpoint: str = UNKNOWN  # with count: the endpoint label it is counted under


class JobMessage:
    """A job message as delivered, and its settlement: aiormq's message, read once.

    The job queues are consumed through aiormq itself: aio-pika's consumer wraps
    each message in an ``IncomingMessage`` (every property copied) and runs the
    callback in a second task, a measurable part of a job's CPU
    (docs/performance.md), as on the gateway's reply queue.
    """

    __slots__ = ("_channel", "_tag", "body", "headers", "properties", "redelivered", "settled")

    def __init__(self, delivered: DeliveredMessage) -> None:
        properties = delivered.header.properties
        self.body = delivered.body
        self.properties = properties
        self.headers: dict[str, Any] = properties.headers or {}
        delivery = delivered.delivery
        self.redelivered = bool(getattr(delivery, "redelivered", False))
        self._tag: int = getattr(delivery, "delivery_tag", 0) or 0
        self._channel = cast(aiormq.Channel, delivered.channel)
        # Acked or nacked already: a second settlement would close the channel.
        self.settled = False

    async def ack(self) -> None:
        """Settle it, once; returns once written, with the job's last event queued
        before it (one write: ``amqp_frames.WriteQueue``). That wait is the worker's
        backpressure: a broker that stops reading stops it finishing, and so taking,
        jobs. A channel that died meanwhile is logged: RabbitMQ redelivers the job."""
        if self.settled:
            return
        self.settled = True
        try:
            await ack_delivery(self._channel, self._tag)
        except (AMQPError, ChannelInvalidStateError, OSError):
            log.warning("job.ack_failed")

    async def nack(self, *, requeue: bool) -> None:
        """Give it back (``requeue``) or drop it, once."""
        if not self.settled:
            self.settled = True
            await self._channel.basic_nack(self._tag, requeue=requeue, wait=False)


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
        self._link = AmqpLink(
            settings, f"worker-{self.worker_id}", setup=self._setup, on_lost=self._on_lost
        )
        # Jobs cancelled because the connection they came on was lost.
        self._lost: set[str] = set()
        self._stopping = False
        self._jobs: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._suspects: AbstractQueue | None = None
        self._suspects_tag: str | None = None
        self._events: AbstractChannel | None = None
        self._replies_exchange = settings.names.reply_exchange
        # Confirmed publishes for the rare paths that must not lose a job.
        self._confirmed: AbstractChannel | None = None
        self.stats = JobStats()
        self.metrics = WorkerMetrics(sorted(self._models))
        self.metrics.watch_scheduler(self.router.counts, self.router.states)
        self.started_at = now_ms()
        # For its heartbeat, and read before a job runs again (the module docstring).
        self._redis: Redis = redis_client(
            settings, timeout_s=settings.redis_timeout_s, max_connections=8
        )
        # The tasks it owns besides jobs.
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect, declare, and start consuming jobs and cancellations."""
        await self._link.start()
        settings = self.settings
        # The first beat before taking part: listed as soon as started (and no
        # connection is left half-open by a stop that comes right after).
        if not await fleet.beat_once(
            self._redis, settings.names, self.heartbeat(), settings.heartbeat_ttl_s
        ):
            log.warning("fleet.heartbeat_failed")
        self._background = [
            asyncio.create_task(watch_lag(self.metrics.loop_lag.set)),
            asyncio.create_task(
                fleet.keep_beating(
                    self._redis,
                    settings.names,
                    self.heartbeat,
                    every_s=settings.heartbeat_s,
                    ttl_s=settings.heartbeat_ttl_s,
                )
            ),
        ]
        log.info("worker.started", worker_id=self.worker_id, endpoints=sorted(self._models))

    def _on_lost(self) -> None:
        # The jobs held on the lost connection go back to the queue (or were
        # lost with their broker) and no event of theirs can reach a gateway:
        # stop them, the same way as at shutdown, leaving them unacked.
        if self._stopping or not self._running:
            return
        log.warning("worker.connection_lost", jobs=len(self._running))
        for job_id, task in list(self._running.items()):
            self._lost.add(job_id)
            task.cancel()

    async def _setup(self, connection: AbstractConnection) -> None:
        """Declare, and consume jobs and cancellations; run on every (re)connect."""
        settings = self.settings
        watch = self._link.watch
        jobs_channel = watch(await connection.channel())
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
        self._events = watch(await connection.channel(publisher_confirms=False))
        self._confirmed = watch(
            await connection.channel(publisher_confirms=True, on_return_raises=True)
        )
        # One suspect at a time: if this worker dies, it implicates that job alone.
        suspects_channel = watch(await connection.channel())
        await suspects_channel.set_qos(prefetch_count=1)
        self._suspects = await declare_suspects(suspects_channel, settings)
        self._suspects_tag = await consume(suspects_channel, self._suspects.name, self._on_suspect)
        await self.router.start()
        self._consumer_tag = await consume(jobs_channel, self._jobs.name, self._on_job)

    def heartbeat(self) -> fleet.Heartbeat:
        """What this worker tells the fleet view about itself now."""
        return fleet.Heartbeat(
            worker_id=self.worker_id,
            version=_VERSION,
            host=socket.gethostname(),
            endpoints=sorted(self._models),
            jobs_in_flight=len(self._running),
            capacity=self.settings.concurrency,
            started_at=self.started_at,
            seen_at=now_ms(),
        )

    def readiness(self) -> dict[str, bool]:
        """The probe's checks: connected to RabbitMQ, and taking jobs (not draining)."""
        jobs = self._jobs
        return {
            # Up only once the setup ran on the current connection (shared.amqp.AmqpLink).
            "amqp": self._link.up,
            "consuming": jobs is not None
            and self._consumer_tag is not None
            and not jobs.channel.is_closed,
        }

    async def stop(self) -> None:
        """Stop taking jobs, drain running ones, close."""
        self._stopping = True
        for queue, attr in ((self._jobs, "_consumer_tag"), (self._suspects, "_suspects_tag")):
            tag = getattr(self, attr)
            if queue is not None and tag is not None:
                setattr(self, attr, None)
                # Bounded: with the broker unreachable a channel would wait for it
                # to come back, and a SIGTERM must still end the worker.
                with contextlib.suppress(AMQPError, ChannelInvalidStateError, TimeoutError):
                    async with asyncio.timeout(_STOP_CALL_S):
                        await queue.cancel(tag)
        running = list(self._running.values())
        if running:
            log.info("worker.draining", jobs=len(running))
            _, late = await asyncio.wait(running, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await stop(self._background)
        # Off the list at once, not when the heartbeat expires.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await fleet.leave(self._redis, self.settings.names, self.worker_id)
        await self._redis.aclose()
        await self.router.close()
        await self._link.close()
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
            log.info("job.orphaned", job_id=message.correlation_id)
            self._cancel(message.correlation_id)

    def _cancel(self, job_id: str) -> None:
        self._cancelled[job_id] = None
        if len(self._cancelled) > _REMEMBER_CANCELLED:
            self._cancelled.popitem(last=False)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()

    async def _on_job(self, delivered: DeliveredMessage) -> None:
        message = JobMessage(delivered)
        disposition = await self._handle(message, suspect=False)
        await self._dispose(message, disposition)

    async def _on_suspect(self, delivered: DeliveredMessage) -> None:
        message = JobMessage(delivered)
        disposition = await self._handle(message, suspect=True)
        await self._dispose(message, disposition)

    async def _closed(self, job_id: str) -> bool:
        """Whether the job's gateway stopped waiting for it (fails open: a run too many
        costs less than a caller never answered)."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s):
                return bool(await self._redis.exists(self.settings.names.closed_job(job_id)))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("job.closed_check_failed", error=type(exc).__name__)
            return False

    async def _claim(self, job: ChatJob) -> bool:
        """Whether this worker is the first to take a job that has copies (fails open)."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s):
                return bool(
                    await self._redis.set(
                        self.settings.names.taken_job(job.job_id),
                        self.worker_id,
                        nx=True,
                        px=max(job.deadline_ms - now_ms(), 1),
                    )
                )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("job.claim_failed", error=type(exc).__name__)
            return True

    async def _handle(self, message: JobMessage, *, suspect: bool) -> Disposition:
        """Run a job, or decide not to; returns what becomes of its message.

        Raises (leaving the message unacked, so another worker takes it) only
        when this worker shuts down mid-job.
        """
        try:
            job = ChatJob.model_validate_json(message.body)
        except ValidationError:
            log.error("wire.invalid_job")
            return Disposition(Action.BURY, reason="invalid")
        endpoint = self.metrics.endpoint(job.endpoint)
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
        if message.redelivered:
            self.metrics.redeliveries.inc()
        again = suspect or message.redelivered or attempt > 1
        if dropped is None and again and await self._closed(job.job_id):
            dropped = "closed"
        if dropped is None and job.once and not again and not await self._claim(job):
            dropped = "copy"  # another copy of it (an aged low job) runs elsewhere
        if message.redelivered and dropped is None:
            # Its holder died during this attempt (the attempt counts the deaths).
            if suspect and attempt > self.settings.jobs_delivery_limit:
                # ...holding it as its one suspect: this job is what kills workers.
                log.warning("job.dead", reason="delivery_limit", deaths=attempt)
                return Disposition(Action.BURY, reason="delivery_limit")
            # Run it again, its attempt counted where the next holder will see it;
            # in isolation once it died twice.
            return Disposition(
                Action.RETRY,
                attempt=attempt + 1,
                suspect=suspect or attempt >= 2,
                deadline_ms=job.deadline_ms,
            )
        if dropped is not None:
            log.info("job.dropped", reason=dropped)
            return Disposition(Action.ACK, count="dropped", endpoint=endpoint)
        task = asyncio.current_task()
        assert task is not None
        self._running[job.job_id] = task
        try:
            await self._run(job, attempt, message)
        except asyncio.CancelledError:
            cancelled = job.job_id in self._cancelled
            # Lost with its connection: cancelled by _on_lost, or by aiormq itself
            # as it closes the channel the job came on (its consumer task), which
            # may come first; nothing else cancels a job but a stop or a cancel.
            if job.job_id in self._lost or not (cancelled or self._stopping):
                task.uncancel()
                log.info("job.abandoned", reason="connection_lost")
                return Disposition(Action.LEAVE, count="abandoned")
            if not cancelled:
                raise  # shutting down: leave it unacked, another worker takes it
            task.uncancel()
            log.info("job.cancelled")
            self.metrics.of(endpoint).job("cancelled")
            await self.stats.add("cancelled")
        finally:
            self._running.pop(job.job_id, None)
            self._lost.discard(job.job_id)
        return Disposition(Action.ACK)

    async def _dispose(self, message: JobMessage, disposition: Disposition) -> None:
        """Settle a job message with RabbitMQ (a job that ran was acked as its last event
        left, by its ``JobEvents``; its ack here does nothing)."""
        if disposition.action is Action.LEAVE:
            if disposition.count is not None:
                await self.stats.add(disposition.count)
            return
        if disposition.action is not Action.ACK:
            # A retry is queued again with its attempt counted; a buried job is
            # dead-lettered: its gateway is told at once, operators keep a copy.
            # Both on the confirming channel, so a lost copy is known.
            retry = disposition.action is Action.RETRY
            names = self.settings.names
            mark: dict[str, object] = (
                {ATTEMPT_HEADER: disposition.attempt}
                if retry
                else {DEAD_HEADER: disposition.reason}
            )
            assert self._confirmed is not None
            properties = message.properties
            try:
                await publish(
                    self._confirmed,
                    message.body,
                    exchange="" if retry else names.dead_exchange,
                    routing_key=(
                        (names.suspect_queue if disposition.suspect else names.jobs_queue)
                        if retry
                        else ""
                    ),
                    message_id=properties.message_id,
                    correlation_id=properties.correlation_id,
                    content_type=properties.content_type,
                    headers={**message.headers, **mark},
                    mandatory=retry,
                    # A copy nobody waits for must leave the queue by itself too.
                    expiration_ms=disposition.deadline_ms - now_ms() if retry else None,
                    # A retried job keeps its place among the priorities.
                    priority=properties.priority,
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
                    log.info(
                        "job.retried",
                        next_attempt=disposition.attempt,
                        suspect=disposition.suspect,
                    )
                else:
                    self.metrics.dead_letters.labels(disposition.reason).inc()
        # A job that ran was acked as its last event left (Worker._call): no-op then.
        await message.ack()
        if disposition.count is not None:
            self.metrics.of(disposition.endpoint).job(disposition.count)
            await self.stats.add(disposition.count)

    def _stream_window(self) -> float:
        return stream_window(self.settings, len(self._running))

    async def _run(self, job: ChatJob, attempt: int, message: JobMessage) -> None:
        assert self._events is not None
        # Counted under the endpoint the bot names first (a fallback that answered
        # is in the logs and the upstream error series).
        label = job.endpoint if job.endpoint in self._models else UNKNOWN
        in_flight = self.metrics.of(label).in_flight
        in_flight.inc()
        try:
            await self._call(job, attempt, label, message)
        finally:
            in_flight.dec()

    async def _call(self, job: ChatJob, attempt: int, label: str, message: JobMessage) -> None:
        assert self._events is not None
        series = self.metrics.of(label)
        started = time.perf_counter()

        def first_delta() -> None:
            series.ttft.observe(time.perf_counter() - started)

        events = JobEvents(
            self._events,
            self._replies_exchange,
            job,
            attempt,
            on_first_delta=first_delta if job.stream else None,
            # Acked as its end or error leaves, in the same write: what is left here
            # (metrics, the log line) is then off the caller's path.
            on_terminal=message.ack,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (job.deadline_ms - now_ms()) / 1000
        outcome = "done"
        if job.wait_until_ms is not None or job.once:
            # Its gateway bounds its wait in the queue: tell it the job left it.
            with contextlib.suppress(AMQPError, ChannelInvalidStateError):
                await events.beat()
        beat = None if job.stream else _Beats(events, self.settings.beat_ms / 1000)
        try:
            async with asyncio.timeout_at(deadline) as window:
                settings = self.settings
                await coalesce(
                    self.router.stream(
                        job, events.answered_by, self._stream_window if job.stream else None
                    ),
                    events.delta,
                    events.end,
                    window_s=self._stream_window if job.stream else settings.whole_window_ms / 1000,
                    max_chars=settings.coalesce_chars if job.stream else settings.whole_chars,
                    first_at_once=job.stream,
                )
        except TimeoutError:
            if not window.expired():
                raise
            if not events.ended:  # else its answer went out in time, then its ack waited
                outcome = "deadline"
                await events.error(DeadlineExceeded("the request deadline passed"))
        except BotlineError as exc:
            outcome = exc.code
            if isinstance(exc, UpstreamError):
                self.metrics.upstream_errors.labels(
                    events.endpoint or label, exc.upstream_status
                ).inc()
            await events.error(exc)
        except (AMQPError, ChannelInvalidStateError):
            raise
        except Exception:
            outcome = "internal_error"
            log.exception("job.crashed")
            await events.error(InternalError("the worker failed on this request"))
        finally:
            if beat is not None:
                await beat.stop()
        elapsed = time.perf_counter() - started
        series.duration.observe(elapsed)
        series.job(outcome)
        if events.usage is not None:
            series.used(events.usage)
        await self.stats.add(outcome)
        log.info(
            "job.finished",
            outcome=outcome,
            endpoint=events.endpoint or job.endpoint,
            ms=round(elapsed * 1000, 2),
        )


class _Beats:
    """A whole answer's sign of life every ``interval_s`` until stopped (the module docstring).

    A timer, and a task only to publish a beat that is due: most whole answers
    end before their first beat, and a task per job that only slept was a
    measurable part of a job's CPU (docs/performance.md). Each job has its
    own, so a lost connection touches no job but through its own publishes.
    """

    __slots__ = ("_events", "_interval_s", "_loop", "_stopped", "_task", "_timer")

    def __init__(self, events: JobEvents, interval_s: float) -> None:
        self._events = events
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(interval_s, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self._stopped:
            self._task = self._loop.create_task(self._beat())

    async def _beat(self) -> None:
        try:
            await self._events.beat()
        except (AMQPError, ChannelInvalidStateError):
            return  # no more beats: the connection is going, or gone
        if not self._stopped:
            self._timer = self._loop.call_later(self._interval_s, self._due)

    async def stop(self) -> None:
        """No more beats; waits for one being published."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def serve(settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain."""
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Probes first: /livez answers (and /readyz says 503) while the broker is still being reached.
    async with serve_probes(settings, worker, worker.metrics):
        await worker.start()
        settle_heap(settings.gc_threshold)
        try:
            await stop.wait()
        finally:
            await worker.stop()
