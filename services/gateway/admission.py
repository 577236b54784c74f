"""Who may ask, and whether now: authentication, admission and settlement of a chat request.

A chat request goes: key -> body -> job -> limits -> run. :func:`chat_session`
does all of it in one ``async with``, so that whatever way the run ends --
answered, failed, or the caller gone -- its usage is counted once and its
rate-limit lease is released.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from aiohttp import web

from services.gateway.bodies import read_body
from services.gateway.chat_run import ChatRun, new_job_id
from services.gateway.job_builder import ChatInput, build_job
from services.gateway.resources import GATEWAY, RATE_HEADERS, REQUEST_ID
from shared.clock import now_ms
from shared.errors import RateLimited
from shared.records import Bot, KeyRecord


def bearer_token(request: web.Request) -> str | None:
    """The token from ``Authorization: Bearer <token>``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def authenticate(request: web.Request) -> tuple[KeyRecord, Bot]:
    """The caller's key and its bot, or the error to answer."""
    gateway = request.config_dict[GATEWAY]
    record, bot = await gateway.keys.resolve(bearer_token(request))
    structlog.contextvars.bind_contextvars(key_id=record.key_id, bot_id=bot.id)
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
    request: web.Request, parse: Callable[[bytes], ChatInput]
) -> AsyncIterator[ChatSession]:
    """Authenticate, validate, admit and run a chat request; leaving settles it.

    ``parse`` is the surface's validation of its body into a :class:`ChatInput`.
    """
    gateway = request.config_dict[GATEWAY]
    record, bot = await authenticate(request)
    chat = parse(await read_body(request))
    settings = gateway.settings
    job = build_job(
        chat,
        bot,
        job_id=new_job_id(),
        request_id=request[REQUEST_ID],
        reply_to=gateway.job_client.reply_queue_name,
        deadline_s=settings.request_deadline_s,
    )
    structlog.contextvars.bind_contextvars(job_id=job.job_id, stream=chat.stream)
    try:
        grant = await gateway.limiter.admit(
            record.key_id, record.limits.over(bot.limits), job.job_id
        )
    except RateLimited as exc:
        request[RATE_HEADERS] = exc.headers
        raise
    request[RATE_HEADERS] = grant.headers
    run = ChatRun(
        gateway.job_client,
        job,
        deadline_s=settings.request_deadline_s,
        event_timeout_s=settings.event_timeout_s,
    )
    # No await in the finally blocks: they run even when the caller went away.
    try:
        async with run:
            try:
                yield ChatSession(chat, bot, run)
            finally:
                # A request is counted once its job was queued.
                gateway.usage.record(record.key_id, bot.id, run.usage)
    finally:
        # The lease is released even when the job could not be queued.
        gateway.limiter.settle(grant, run.usage.total_tokens if run.usage else 0)
        if run.abandoned:
            # Nobody waits for this answer any more: no worker may start it again.
            gateway.closed_jobs.close(job)
