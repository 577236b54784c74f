"""What a request handler reaches: the gateway's resources, and the steps both surfaces share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from redis.asyncio import Redis

from services.gateway.chat import ChatInput, build_job
from services.gateway.engine import ChatRun, new_job_id
from services.gateway.keycache import KeyCache
from services.gateway.relay import Relay
from services.gateway.settings import GatewaySettings
from shared.errors import RequestTooLarge
from shared.models import Bot, KeyRecord

REQUEST_ID = web.RequestKey("request_id", str)


@dataclass(slots=True)
class Gateway:
    """The resources of one gateway process."""

    settings: GatewaySettings
    redis: Redis
    keys: KeyCache
    relay: Relay


GATEWAY = web.AppKey("gateway", Gateway)


def bearer_token(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer <key>``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def read_body(request: web.Request) -> bytes:
    """The request body, within the size limit."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].settings.max_body_bytes
        raise RequestTooLarge(f"the body is larger than {limit} bytes") from None


async def authenticate(request: web.Request) -> tuple[KeyRecord, Bot]:
    """The caller's key and its bot, or the error to answer."""
    record, bot = await request.app[GATEWAY].keys.resolve(bearer_token(request))
    structlog.contextvars.bind_contextvars(key_id=record.key_id, bot_id=bot.id)
    return record, bot


async def open_chat(
    request: web.Request, parse: Callable[[bytes], ChatInput]
) -> tuple[ChatInput, Bot, ChatRun]:
    """Authenticate, validate and turn a chat request into a (not yet entered) run."""
    gateway = request.app[GATEWAY]
    _, bot = await authenticate(request)
    chat = parse(await read_body(request))
    settings = gateway.settings
    job = build_job(
        chat,
        bot,
        job_id=new_job_id(),
        request_id=request[REQUEST_ID],
        reply_to=gateway.relay.reply_queue_name,
        deadline_s=settings.request_deadline_s,
    )
    structlog.contextvars.bind_contextvars(job_id=job.job_id, stream=chat.stream)
    run = ChatRun(
        gateway.relay,
        job,
        deadline_s=settings.request_deadline_s,
        event_timeout_s=settings.event_timeout_s,
    )
    return chat, bot, run
