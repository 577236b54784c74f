"""RabbitMQ topology, declared in one place by every process that needs it.

- ``<ns>.jobs``: a durable quorum queue. ``x-delivery-limit`` bounds how often a
  job is redelivered after a worker died holding it; past it the job is
  dead-lettered. ``x-max-length`` with ``reject-publish`` makes a full queue
  answer the gateway's publish with a nack (seen only with publisher confirms).
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

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from shared.settings import CommonSettings

# Header naming the gateway that owns a job; dead jobs are routed back on it.
GATEWAY_HEADER = "x-botline-gateway"


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
        "x-queue-type": "quorum",
        "x-max-length": settings.jobs_max_length,
        "x-overflow": "reject-publish",
        "x-delivery-limit": settings.jobs_delivery_limit,
        "x-dead-letter-exchange": names.dead_exchange,
    }
    return await channel.declare_queue(names.jobs_queue, durable=True, arguments=arguments)


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
    for queue in (names.jobs_queue, names.dead_queue):
        await channel.queue_delete(queue)
    exchanges = (
        names.dead_exchange,
        names.control_exchange,
        names.reply_exchange,
        names.unroutable_exchange,
    )
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
