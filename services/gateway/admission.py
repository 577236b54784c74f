"""Who may ask, and whether now: authentication, admission and settlement of a chat request.

A chat request goes: key -> body -> job -> limits -> run. :func:`chat_session`
does all of it in one ``async with``, so that whatever way the run ends --
answered, failed, or the caller gone -- its usage is counted once and its
rate-limit lease is released.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from aiohttp import web

from services.gateway.bodies import read_body
from services.gateway.chat_run import ChatRun, new_job_id
from services.gateway.inflight import Ticket
from services.gateway.job_builder import ChatInput, build_job
from services.gateway.metrics import surface_of
from services.gateway.resources import (
    BOT_ID,
    RATE_HEADERS,
    REQUEST_ID,
    STARTED,
    STREAM,
    gateway_of,
)
from shared import keys, tokens
from shared.clock import now_ms
from shared.errors import ApiKeyDisabled, ApiKeyExpired, InvalidApiKey, RateLimited
from shared.records import Bot, KeyRecord
from shared.wire import Usage


def bearer_token(request: web.Request) -> str | None:
    """The token from ``Authorization: Bearer <token>``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def authenticate(request: web.Request) -> tuple[KeyRecord, Bot]:
    """The caller's key and its bot, or the error to answer.

    An address with too many failures this minute gets a 429 before its key is
    looked at (:mod:`services.gateway.auth_failures`).
    """
    gateway = gateway_of(request)
    # The TCP peer: X-Forwarded-For is not trusted (see auth_failures).
    address = request.remote or ""
    gateway.auth_failures.check(address)
    try:
        record, bot = await gateway.keys.resolve(bearer_token(request))
    except (InvalidApiKey, ApiKeyDisabled, ApiKeyExpired):
        gateway.auth_failures.failed(address)
        raise
    structlog.contextvars.bind_contextvars(key_id=record.key_id, bot_id=bot.id)
    request[BOT_ID] = bot.id
    gateway.usage.used(record.key_id, now_ms())
    return record, bot


@dataclass(frozen=True, slots=True)
class ChatSession:
    """An admitted chat request whose job is running."""

    input: ChatInput
    bot: Bot
    run: ChatRun


@asynccontextmanager
async def chat_session(
    request: web.Request, parse: Callable[[bytes, Bot], ChatInput]
) -> AsyncIterator[ChatSession]:
    """Authenticate, validate, admit and run a chat request; leaving settles it.

    ``parse`` is the surface's validation of its body, for the key's bot, into a
    :class:`ChatInput`. While it runs the request holds a ticket for its key, so
    that a revoke, a disable or the key's expiry ends it
    (:mod:`services.gateway.inflight`).
    """
    gateway = gateway_of(request)
    generation = gateway.keys.generation
    record, bot = await authenticate(request)
    key_hash = keys.hash_key(bearer_token(request) or "")
    with gateway.inflight.track(key_hash, record) as ticket:
        if gateway.keys.generation != generation:
            # A change heard during the lookup may not be in what it read.
            gateway.inflight.recheck(key_hash)
        async with _admitted(request, parse, record, bot, ticket) as session:
            yield session


@asynccontextmanager
async def _admitted(
    request: web.Request,
    parse: Callable[[bytes, Bot], ChatInput],
    record: KeyRecord,
    bot: Bot,
    ticket: Ticket,
) -> AsyncIterator[ChatSession]:
    gateway = gateway_of(request)
    chat = parse(await read_body(request), bot)
    settings = gateway.settings
    job = build_job(
        chat,
        bot,
        job_id=new_job_id(),
        request_id=request[REQUEST_ID],
        reply_to=gateway.job_client.reply_queue_name,
        deadline_s=settings.request_deadline_s,
        queue_wait_s=(
            settings.request_deadline_s * settings.queue_wait_share
            if settings.queue_wait_share < 1
            else None
        ),
    )
    structlog.contextvars.bind_contextvars(job_id=job.job_id, stream=chat.stream)
    limits = record.limits.over(bot.limits)
    # Costs a pass over the prompt: only for keys whose tokens are limited.
    prompt_estimate = tokens.estimate_prompt(job.messages) if limits.tpm else None
    if ticket.error is not None:
        raise ticket.error  # the key changed while the body was read
    request[STREAM] = chat.stream
    try:
        grant = await gateway.limiter.admit(
            record.key_id, limits, job.job_id, (prompt_estimate or 0) + job.max_tokens
        )
    except RateLimited as exc:
        request[RATE_HEADERS] = exc.headers
        raise
    request[RATE_HEADERS] = grant.headers
    try:
        # The key's class, a step lower over its fair share: no Redis call.
        klass = record.priority or bot.priority
        placed = gateway.fair_share.place(ticket.key_hash, klass)
    except BaseException:
        gateway.limiter.settle(grant, 0)
        raise
    if klass == "low" and settings.priority_aging_s:
        # Copies of it may be queued as it ages: the first one taken runs.
        job = job.model_copy(update={"once": True})
    metrics = gateway.metrics
    started = request.get(STARTED, time.perf_counter())

    def first_token() -> None:
        metrics.first_token(surface_of(request.path), time.perf_counter() - started, bot.id)

    run = ChatRun(
        gateway.job_client,
        job,
        deadline_s=settings.request_deadline_s,
        event_timeout_s=settings.event_timeout_s,
        prompt_estimate=prompt_estimate,
        metrics=metrics,
        on_first_token=first_token if chat.stream else None,
        priority=placed.priority,
        aging_s=settings.priority_aging_s,
        # Over its share, the job may wait here for a slot outside the reserve.
        slots=gateway.fair_share.slots,
        lowered=placed.lowered,
    )
    # No await in the finally blocks: they run even when the caller went away.
    charged = Usage()
    # Attached before the run starts: a revoke ends a job held for a slot too.
    ticket.attach(run)
    try:
        async with run:
            try:
                yield ChatSession(chat, bot, run)
            finally:
                # A request is counted once its job was queued; one that ended
                # early is charged what it was sent (ChatRun.charge).
                charged = run.charge()
                gateway.usage.record(record.key_id, bot.id, charged)
    finally:
        # The lease is released, and the reservation given back, even when
        # the job could not be queued.
        gateway.limiter.settle(grant, charged.total_tokens)
        if run.abandoned:
            # Nobody waits for this answer any more: no worker may start it again.
            gateway.closed_jobs.close(job)
