"""What a request handler reaches: the gateway's resources, and the steps both surfaces share.

A chat request goes: key -> body -> job -> limits -> run. :class:`Chat`
wraps the run so that whatever way it ends -- answered, failed, or the caller
gone -- its usage is counted once and its rate-limit lease is released.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import structlog
from aiohttp import web
from redis.asyncio import Redis

from services.gateway.chat import ChatInput, build_job
from services.gateway.engine import ChatRun, new_job_id
from services.gateway.keycache import KeyCache
from services.gateway.limits import Grant, Limiter, RateLimited
from services.gateway.relay import Relay
from services.gateway.settings import GatewaySettings
from services.gateway.usage import UsageBook
from shared.errors import RequestTooLarge
from shared.models import Bot, KeyRecord
from shared.registry import Registry, now_ms

REQUEST_ID = web.RequestKey("request_id", str)
# Rate-limit headers for the response, whichever way it ends.
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])


@dataclass(slots=True)
class Gateway:
    """The resources of one gateway process."""

    settings: GatewaySettings
    redis: Redis
    registry: Registry
    keys: KeyCache
    relay: Relay
    limiter: Limiter
    usage: UsageBook


GATEWAY = web.AppKey("gateway", Gateway)


def bearer_token(request: web.Request) -> str | None:
    """The token from ``Authorization: Bearer <token>``, or None."""
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
        limit = request.config_dict[GATEWAY].settings.max_body_bytes
        raise RequestTooLarge(f"the body is larger than {limit} bytes") from None


async def authenticate(request: web.Request) -> tuple[KeyRecord, Bot]:
    """The caller's key and its bot, or the error to answer."""
    gateway = request.config_dict[GATEWAY]
    record, bot = await gateway.keys.resolve(bearer_token(request))
    structlog.contextvars.bind_contextvars(key_id=record.key_id, bot_id=bot.id)
    gateway.usage.used(record.key_id, now_ms())
    return record, bot


class Chat:
    """A chat request in flight: enter it to run the job; leaving settles it."""

    def __init__(
        self, gateway: Gateway, record: KeyRecord, bot: Bot, chat: ChatInput, run: ChatRun
    ):
        self.gateway = gateway
        self.record = record
        self.bot = bot
        self.input = chat
        self.run = run
        self.grant: Grant | None = None

    async def __aenter__(self) -> ChatRun:
        await self.run.__aenter__()
        return self.run

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.run.__aexit__(exc_type, exc, tb)
        finally:
            # No await from here on: this runs even when the caller went away.
            usage = self.run.usage
            self.gateway.usage.record(self.record.key_id, self.bot.id, usage)
            if self.grant is not None:
                self.gateway.limiter.settle(self.grant, usage.total_tokens if usage else 0)


async def open_chat(request: web.Request, parse: Callable[[bytes], ChatInput]) -> Chat:
    """Authenticate, validate, admit: a chat request ready to run (``async with``)."""
    gateway = request.config_dict[GATEWAY]
    record, bot = await authenticate(request)
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
    try:
        grant = await gateway.limiter.admit(
            record.key_id, record.limits.over(bot.limits), job.job_id
        )
    except RateLimited as exc:
        request[RATE_HEADERS] = exc.headers
        raise
    request[RATE_HEADERS] = grant.headers
    run = ChatRun(
        gateway.relay,
        job,
        deadline_s=settings.request_deadline_s,
        event_timeout_s=settings.event_timeout_s,
    )
    session = Chat(gateway, record, bot, chat, run)
    session.grant = grant
    return session
