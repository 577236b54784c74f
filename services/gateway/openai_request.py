"""Validating an OpenAI chat-completions body into a :class:`ChatInput`.

Parameters an OpenAI-compatible model understands pass through unchanged;
those botline cannot honour are refused with a 400 naming them -- never a
silently different answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from services.gateway.bodies import invalid, load_object
from services.gateway.job_builder import ChatInput
from shared.errors import UnsupportedParameter
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


class OpenAIMessage(BaseModel):
    """A message in OpenAI's format; extra fields (``tool_calls``...) are kept."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_where_needed(self) -> OpenAIMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.model_extra:
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


def parse_openai_request(raw: bytes) -> ChatInput:
    """Validate an OpenAI-format request body."""
    try:
        request = OpenAIRequest.model_validate(load_object(raw))
    except ValidationError as exc:
        raise invalid(exc) from None
    _refuse_unsupported(request)
    params = {name: value for name in PASSTHROUGH if (value := getattr(request, name)) is not None}
    return ChatInput(
        messages=[ChatMessage.model_validate(m.model_dump()) for m in request.messages],
        stream=request.stream,
        max_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        params=params,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )
