"""``POST /v1/chat/completions`` in the seed's format (AIFlowy's "request a bot via ApiKey").

Whole answers are one object with ``status: END``; streams are ``START``,
``MIDDLE``..., ``END`` events (``END`` carries usage), with no ``[DONE]``.
``created`` is epoch milliseconds and ``choices`` an object, as in the seed.
A failure after the stream started ends it with one ``ERROR`` event.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from services.gateway.admission import chat_session
from services.gateway.bodies import invalid, load_object, trim_messages
from services.gateway.chat_run import Answer
from services.gateway.job_builder import ChatInput
from services.gateway.middleware import send_now
from services.gateway.sse import event, write_stream
from shared.clock import now_ms
from shared.errors import BotlineError
from shared.records import Bot
from shared.wire import ChatMessage, DeltaEvent, EndEvent, Usage


class SeedMessage(BaseModel):
    """A message as the seed's callers send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)


class SeedRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[SeedMessage] = Field(min_length=1)
    stream: StrictBool = False
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    # Accepted and ignored: the bot decides the model.
    model: Any = None


def parse_seed_request(raw: bytes, bot: Bot) -> ChatInput:
    """Validate a seed-format request body; only the bot's last messages are kept."""
    data = load_object(raw)
    cut = trim_messages(data, bot.max_history_messages)
    try:
        request = SeedRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, cut) from None
    return ChatInput(
        messages=[ChatMessage(role=m.role, content=m.content) for m in request.messages],
        stream=request.stream,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
    )


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "completionTokens": usage.completion_tokens,
        "promptTokens": usage.prompt_tokens,
        "totalTokens": usage.total_tokens,
    }


def render_whole(job_id: str, answer: Answer) -> dict[str, Any]:
    """A whole answer; ``id`` and ``finishReason`` are additions to the seed."""
    return {
        "status": "END",
        "usage": _usage(answer.usage),
        "created": now_ms(),
        "choices": {"index": 0, "message": {"content": answer.text, "role": "assistant"}},
        "id": job_id,
        "finishReason": answer.finish_reason,
    }


def _chunk(status: str, text: str, end: EndEvent | None = None) -> bytes:
    chunk: dict[str, Any] = {
        "status": status,
        "created": now_ms(),
        "choices": {"delta": {"content": text, "role": "assistant"}, "index": 0},
    }
    if end is not None:
        chunk["usage"] = _usage(end.usage)
        chunk["finishReason"] = end.finish_reason
    return event(chunk)


class SeedStream:
    """``START`` with the first piece, ``MIDDLE`` for each later one, ``END`` with usage."""

    def first(self, item: DeltaEvent) -> bytes:
        """START carries the first piece."""
        return _chunk("START", item.text)

    def delta(self, item: DeltaEvent) -> bytes:
        """MIDDLE."""
        return _chunk("MIDDLE", item.text)

    def end(self, item: EndEvent) -> bytes:
        """END, with the last piece (may be empty) and usage."""
        return _chunk("END", item.text, item)

    def error(self, error: BotlineError) -> bytes:
        """ERROR, then the stream closes."""
        return event({"status": "ERROR", "created": now_ms(), **error.body()})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """The seed's endpoint."""
    async with chat_session(request, parse_seed_request) as session:
        if session.input.stream:
            return await write_stream(request, session.run, SeedStream())
        answer = await session.run.complete()
        # Written before the session settles (services.gateway.middleware.send_now).
        return await send_now(
            request,
            web.Response(
                body=orjson.dumps(render_whole(session.run.job.job_id, answer)),
                content_type="application/json",
                headers=session.run.headers(),
            ),
        )
