"""A chat request, whichever surface it came through, resolved against its bot into a job.

Each surface validates its own body into a :class:`ChatInput`; from there on
the path is one: :func:`build_job` applies the bot's prompt, history limit,
caps and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.clock import now_ms
from shared.records import Bot
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
    queue_wait_s: float | None = None,
) -> ChatJob:
    """The job for a request: the bot's prompt first, its history limit, its caps."""
    messages = [ChatMessage(role="system", content=bot.system_prompt)] if bot.system_prompt else []
    messages += _history(chat.messages, bot.max_history_messages)
    max_tokens = min(chat.max_tokens or bot.max_reply_tokens, bot.max_reply_tokens)
    now = now_ms()
    return ChatJob(
        wait_until_ms=None if queue_wait_s is None else now + int(queue_wait_s * 1000),
        job_id=job_id,
        request_id=request_id,
        reply_to=reply_to,
        deadline_ms=now + int(deadline_s * 1000),
        endpoint=bot.endpoint,
        model=bot.model,
        messages=messages,
        temperature=bot.temperature if chat.temperature is None else chat.temperature,
        top_p=bot.top_p if chat.top_p is None else chat.top_p,
        max_tokens=max_tokens,
        stream=chat.stream,
        params=chat.params,
        endpoints=bot.endpoint_plan(),
    )
