"""RabbitMQ topology, declared in one place by every process that needs it.

- ``<ns>.jobs``: a durable classic queue of transient jobs. A job lives only
  as long as its caller waits on a live connection, so it is not written to
  disk: a quorum queue cost several times RabbitMQ's CPU per request and
  added latency (figures in docs/performance.md), for a durability nobody
  could use (after a broker restart no gateway still holds the caller). ``x-max-length``
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
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError
from pamqp.commands import Basic

from shared.settings import CommonSettings

log = structlog.get_logger("botline.amqp")

# Header naming the gateway that owns a job; dead jobs are routed back on it.
GATEWAY_HEADER = "x-botline-gateway"
# The job's attempt (1 + redeliveries so far), kept by the workers.
ATTEMPT_HEADER = "x-botline-attempt"
# Set on a dead-lettered job: why it was given up.
DEAD_HEADER = "x-botline-dead"


async def connect(settings: CommonSettings, name: str) -> AbstractRobustConnection:
    """A robust connection named ``name`` (seen in RabbitMQ's management UI).

    Retried each second until ``startup_timeout_s``, so that services may
    start before the broker; after that aio-pika reconnects on its own.
    """
    async with asyncio.timeout(settings.startup_timeout_s):
        while True:
            try:
                return await aio_pika.connect_robust(
                    settings.amqp_url.get_secret_value(),
                    heartbeat=settings.amqp_heartbeat_s,
                    client_properties={"connection_name": name},
                )
            except (AMQPError, OSError) as exc:
                log.warning("amqp.connect_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)


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
) -> None:
    """Publish one transient JSON message on the channel's own connection.

    Goes to aiormq directly: aio-pika's ``Message`` object was a large part of
    a publish's CPU, on the path every job and every delta takes
    (docs/performance.md). On a confirming channel this waits for the broker's
    confirm and raises aio-pika's ``DeliveryError`` (nack) or ``PublishError``
    (returned) like ``Exchange.publish`` does.

    Without ``wait`` this returns once the message is queued for the
    connection's writer (or, on a confirming channel, once confirmed), not
    after the writer has drained it to the socket: aiormq holds the channel's
    lock for that wait, so every publisher on a busy channel would queue
    behind the others' socket writes, which cost throughput under load
    (docs/performance.md). Order on the connection is kept either way.
    ``wait=True`` is backpressure: the writer's queue is bounded, and a
    waiting publish makes the writer drain the socket first.
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
    )
    await raw.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=mandatory,
        wait=wait,
    )


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
        "x-queue-type": "classic",
        "x-max-length": settings.jobs_max_length,
        "x-overflow": "reject-publish",
    }
    await declare_suspects(channel, settings)
    return await channel.declare_queue(names.jobs_queue, durable=True, arguments=arguments)


async def declare_suspects(channel: AbstractChannel, settings: CommonSettings) -> AbstractQueue:
    """Declare the queue of jobs that died twice (services/worker/worker.py); returns it."""
    # Not bounded: it only ever holds jobs the jobs queue already admitted.
    return await channel.declare_queue(
        settings.names.suspect_queue, durable=True, arguments={"x-queue-type": "classic"}
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
