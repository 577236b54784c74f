"""A chat request: validated from the body, resolved against its bot into a job."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from shared.errors import InvalidRequest
from shared.models import Bot
from shared.registry import now_ms
from shared.wire import ChatJob, ChatMessage


class RequestMessage(BaseModel):
    """A message as callers send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)


class ChatRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[RequestMessage] = Field(min_length=1)
    stream: StrictBool = False
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    # Accepted and ignored: the bot decides the model.
    model: Any = None


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a request body; the error names the field, never echoes its content."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = _field_name(tuple(first["loc"]))
        raise InvalidRequest(f"{field}: {first['msg']}", param=field) from None


def build_job(
    request: ChatRequest,
    bot: Bot,
    *,
    job_id: str,
    request_id: str,
    reply_to: str,
    deadline_s: float,
) -> ChatJob:
    """The job for a request: the bot's prompt first, its history limit, its caps."""
    history = request.messages[-bot.max_history_messages :]
    messages = [ChatMessage(role="system", content=bot.system_prompt)] if bot.system_prompt else []
    messages += [ChatMessage(role=m.role, content=m.content) for m in history]
    max_tokens = min(request.max_tokens or bot.max_reply_tokens, bot.max_reply_tokens)
    return ChatJob(
        job_id=job_id,
        request_id=request_id,
        reply_to=reply_to,
        deadline_ms=now_ms() + int(deadline_s * 1000),
        endpoint=bot.endpoint,
        model=bot.model,
        messages=messages,
        temperature=bot.temperature if request.temperature is None else request.temperature,
        top_p=bot.top_p if request.top_p is None else request.top_p,
        max_tokens=max_tokens,
    )
