"""A chat request, whichever surface it came through, resolved against its bot into a job.

Each surface validates its own body into a :class:`ChatInput`; from there on
the path is one: :func:`build_job` applies the bot's prompt, history limit,
caps and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from shared.errors import InvalidRequest
from shared.models import Bot
from shared.registry import now_ms
from shared.wire import ChatJob, ChatMessage


@dataclass(frozen=True, slots=True)
class ChatInput:
    """A validated chat request, surface-independent."""

    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # Passed to the model unchanged (the OpenAI surface's stop, seed, tools, ...).
    params: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = False


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


def field_name(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def invalid(exc: ValidationError) -> InvalidRequest:
    """The first validation error, naming the field and never echoing its content."""
    first = exc.errors(include_input=False, include_url=False)[0]
    name = field_name(tuple(first["loc"]))
    return InvalidRequest(f"{name}: {first['msg']}", param=name)


def parse_chat_request(raw: bytes) -> ChatInput:
    """Validate a seed-format request body."""
    try:
        request = SeedRequest.model_validate(load_object(raw))
    except ValidationError as exc:
        raise invalid(exc) from None
    return ChatInput(
        messages=[ChatMessage(role=m.role, content=m.content) for m in request.messages],
        stream=request.stream,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
    )


def _history(messages: list[ChatMessage], limit: int) -> list[ChatMessage]:
    kept = messages[-limit:]
    # A tool result whose assistant call was cut off would be refused upstream.
    while kept and kept[0].role == "tool":
        kept = kept[1:]
    return kept


def build_job(
    chat: ChatInput,
    bot: Bot,
    *,
    job_id: str,
    request_id: str,
    reply_to: str,
    deadline_s: float,
) -> ChatJob:
    """The job for a request: the bot's prompt first, its history limit, its caps."""
    messages = [ChatMessage(role="system", content=bot.system_prompt)] if bot.system_prompt else []
    messages += _history(chat.messages, bot.max_history_messages)
    max_tokens = min(chat.max_tokens or bot.max_reply_tokens, bot.max_reply_tokens)
    return ChatJob(
        job_id=job_id,
        request_id=request_id,
        reply_to=reply_to,
        deadline_ms=now_ms() + int(deadline_s * 1000),
        endpoint=bot.endpoint,
        model=bot.model,
        messages=messages,
        temperature=bot.temperature if chat.temperature is None else chat.temperature,
        top_p=bot.top_p if chat.top_p is None else chat.top_p,
        max_tokens=max_tokens,
        stream=chat.stream,
        params=chat.params,
    )
