"""The gateway's side of RabbitMQ: publish jobs, receive their events, cancel them.

One connection and one exclusive reply queue per gateway process; each
event is routed to the waiting request by its correlation id (the job id).
Jobs are published with publisher confirms and ``mandatory``: a full queue
answers with a nack and a missing queue with a return, and both must reach
the caller as a 503 instead of a job silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Final

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from shared.amqp import (
    DEAD_HEADER,
    GATEWAY_HEADER,
    connect,
    declare_control,
    declare_jobs,
    declare_replies,
    publish,
)
from shared.errors import BackendUnavailable, Overloaded
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


DEAD: Final = DeadJob()
_BEAT: Final = BeatEvent.model_fields["type"].default
Incoming = DeltaEvent | EndEvent | ErrorEvent | DeadJob


class JobClient:
    """Owns this gateway's AMQP connection, reply queue and in-flight jobs."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or secrets.token_hex(6)
        self.reply_queue_name = settings.names.reply_queue(self.gateway_id)
        self._pending: dict[str, asyncio.Queue[Incoming]] = {}
        self._tasks = TaskSet()
        self._connection: AbstractRobustConnection | None = None
        self._publish: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None

    async def start(self) -> None:
        """Connect (retrying until ``startup_timeout_s``) and declare what we use."""
        connection = await connect(self.settings, f"gateway-{self.gateway_id}")
        self._connection = connection
        self._publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_jobs(self._publish, self.settings)
        await declare_control(self._publish, self.settings)
        replies_exchange, _ = await declare_replies(self._publish, self.settings)
        replies = await connection.channel(publisher_confirms=False)
        self._reply_queue = await replies.declare_queue(
            self.reply_queue_name, exclusive=True, auto_delete=True
        )
        await self._reply_queue.bind(replies_exchange, routing_key=self.reply_queue_name)
        # Jobs dead-lettered after too many deliveries come back to their gateway.
        await self._reply_queue.bind(
            self.settings.names.dead_exchange,
            arguments={"x-match": "all", GATEWAY_HEADER: self.gateway_id},
        )
        await self._reply_queue.consume(self._on_reply, no_ack=True)
        log.info("amqp.ready", reply_queue=self.reply_queue_name)

    async def close(self) -> None:
        """Finish pending cancellations, then close the connection."""
        await self._tasks.close()
        if self._connection is not None:
            await self._connection.close()

    @property
    def ready(self) -> bool:
        """Connected, with the reply queue consuming."""
        connection, publish = self._connection, self._publish
        return bool(
            connection is not None
            and not connection.is_closed
            and publish is not None
            and not publish.is_closed
        )

    def register(self, job_id: str) -> asyncio.Queue[Incoming]:
        """Start routing a job's events to the returned queue."""
        queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self._pending[job_id] = queue
        return queue

    def forget(self, job_id: str) -> None:
        """Stop routing a job's events; later ones are dropped."""
        self._pending.pop(job_id, None)

    async def submit(self, job: ChatJob) -> None:
        """Publish a job and wait for the broker's confirm."""
        if self._publish is None:
            raise BackendUnavailable("the job queue is unreachable")
        try:
            async with asyncio.timeout(self.settings.publish_timeout_s):
                # Transient: see shared/amqp.py for why jobs are not written to disk.
                await publish(
                    self._publish,
                    job.dump(),
                    routing_key=self.settings.names.jobs_queue,
                    message_id=job.job_id,
                    correlation_id=job.job_id,
                    message_type=job.type,
                    headers={GATEWAY_HEADER: self.gateway_id},
                    mandatory=True,
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
        if self._publish is None:
            return
        with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError, TimeoutError):
            async with asyncio.timeout(self.settings.publish_timeout_s):
                cancel = CancelJob(job_id=job_id)
                await publish(
                    self._publish,
                    cancel.dump(),
                    exchange=self.settings.names.control_exchange,
                    routing_key="",
                    message_id=f"cancel.{job_id}",
                    message_type=cancel.type,
                )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.type == _BEAT:
            return  # a whole answer's sign of life, for the worker's sake (shared/wire.py)
        queue = self._pending.get(message.correlation_id or "")
        if queue is None:
            return  # the caller is gone; late events are expected
        if message.headers.get(DEAD_HEADER):
            queue.put_nowait(DEAD)
            return
        try:
            event = decode_event(message.body)
        except ValidationError:
            log.warning("wire.invalid_event", message_type=message.type)
            return
        queue.put_nowait(event)
