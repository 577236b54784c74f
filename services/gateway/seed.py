"""``POST /v1/chat/completions`` in the seed's format (AIFlowy's "request a bot via ApiKey").

Whole answers are one object with ``status: END``; streams are ``START``,
``MIDDLE``..., ``END`` events (``END`` carries usage), with no ``[DONE]``.
``created`` is epoch milliseconds and ``choices`` an object, as in the seed.
A failure after the stream started ends it with one ``ERROR`` event.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from services.gateway.chat import parse_chat_request
from services.gateway.context import open_chat
from services.gateway.engine import Answer
from services.gateway.sse import event, relay_stream
from shared.errors import BotlineError
from shared.registry import now_ms
from shared.wire import DeltaEvent, EndEvent, Usage


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
    chat = await open_chat(request, parse_chat_request)
    async with chat as run:
        if chat.input.stream:
            return await relay_stream(request, run, SeedStream())
        answer = await run.complete()
        return web.Response(
            body=orjson.dumps(render_whole(run.job.job_id, answer)),
            content_type="application/json",
        )
