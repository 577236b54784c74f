"""Validating an OpenAI chat-completions body into a :class:`ChatInput`.

Parameters an OpenAI-compatible model understands pass through unchanged;
those botline cannot honour are refused with a 400 naming them -- never a
silently different answer. Messages keep only the fields OpenAI defines for
their role; non-text content parts reach the model only for bots that allow
them (``allowed_content``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from services.gateway.bodies import MAX_CONTENT_PARTS, invalid, load_object, trim_messages
from services.gateway.job_builder import ChatInput
from shared.errors import InvalidRequest, UnsupportedParameter
from shared.records import Bot, ContentKind
from shared.wire import ChatMessage

# Passed to the model as they are; the bot's caps still apply to the rest.
PASSTHROUGH = (
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "user",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
)


# The fields OpenAI defines per role, besides role and content; others are dropped.
MESSAGE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset({"name"}),
    "developer": frozenset({"name"}),
    "user": frozenset({"name"}),
    "assistant": frozenset({"name", "tool_calls", "refusal", "audio", "function_call"}),
    "tool": frozenset({"tool_call_id"}),
}
# What an assistant message without content must carry instead.
_ANSWER_FIELDS = frozenset({"tool_calls", "function_call", "refusal", "audio"})
# Content parts that are text, and what a bot must allow for each other kind.
TEXT_PARTS = frozenset({"text", "refusal"})
PART_KINDS: dict[str, ContentKind] = {"image_url": "image", "input_audio": "audio", "file": "file"}


class OpenAIMessage(BaseModel):
    """A message in OpenAI's format; extra fields (``tool_calls``...) are read, then
    only OpenAI's own are kept (:data:`MESSAGE_FIELDS`)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _not_too_many_parts(cls, content: object) -> object:
        if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts")
        return content

    @model_validator(mode="after")
    def _content_where_needed(self) -> OpenAIMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        extra = set(self.model_extra or ())
        if self.role == "assistant" and self.content is None and not extra & _ANSWER_FIELDS:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.role == "tool" and not (self.model_extra or {}).get("tool_call_id"):
            raise ValueError("a tool message needs tool_call_id")
        return self


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class OpenAIRequest(BaseModel):
    """The body of ``POST /openai/v1/chat/completions``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    # Required by the SDKs, ignored here: the key's bot decides the model.
    model: str | None = None
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, strict=True)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = None
    functions: Any = None
    function_call: Any = None
    modalities: list[str] | None = None

    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, strict=True)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: dict[str, Any] | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: str | None = None


def _refuse_unsupported(request: OpenAIRequest) -> None:
    if request.n is not None and request.n > 1:
        raise UnsupportedParameter("n: only one choice per request is supported", param="n")
    if request.logprobs or request.top_logprobs is not None:
        param = "logprobs" if request.logprobs else "top_logprobs"
        raise UnsupportedParameter(f"{param}: log probabilities are not relayed", param=param)
    for legacy in ("functions", "function_call"):
        if getattr(request, legacy) is not None:
            raise UnsupportedParameter(f"{legacy}: use tools and tool_choice", param=legacy)
    if request.modalities and set(request.modalities) != {"text"}:
        raise UnsupportedParameter("modalities: only text is supported", param="modalities")


def _refuse_unasked_content(messages: list[OpenAIMessage], bot: Bot, cut: int) -> None:
    """A 400 naming the first content part the bot does not take."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            kind = part.get("type")
            if kind in TEXT_PARTS:
                continue
            name = f"messages[{i + cut}].content[{j}].type"
            needed = PART_KINDS.get(kind) if isinstance(kind, str) else None
            if needed is None:
                raise InvalidRequest(f"{name}: not a known content part type", param=name)
            if needed not in bot.allowed_content:
                raise InvalidRequest(f"{name}: this bot does not accept {kind} parts", param=name)


def _chat_message(message: OpenAIMessage) -> ChatMessage:
    allowed = MESSAGE_FIELDS[message.role]
    extra = {k: v for k, v in (message.model_extra or {}).items() if k in allowed}
    return ChatMessage(role=message.role, content=message.content, **extra)


def parse_openai_request(raw: bytes, bot: Bot) -> ChatInput:
    """Validate an OpenAI-format request body for ``bot``.

    Only the bot's last ``max_history_messages`` are validated and kept: the
    others would not be sent to the model anyway.
    """
    data = load_object(raw)
    cut = trim_messages(data, bot.max_history_messages)
    try:
        request = OpenAIRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, cut) from None
    _refuse_unsupported(request)
    _refuse_unasked_content(request.messages, bot, cut)
    params = {name: value for name in PASSTHROUGH if (value := getattr(request, name)) is not None}
    return ChatInput(
        messages=[_chat_message(m) for m in request.messages],
        stream=request.stream,
        max_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        params=params,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )
