"""``POST /v1/chat/completions`` in the seed's format (AIFlowy's "request a bot via ApiKey").

Whole answers are one object with ``status: END``; streams are ``START``,
``MIDDLE``..., ``END`` events (``END`` carries usage), with no ``[DONE]``.
``created`` is epoch milliseconds and ``choices`` an object, as in the seed.
A failure after the stream started ends it with one ``ERROR`` event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.gateway.context import open_chat
from services.gateway.engine import Answer, ChatRun
from services.gateway.sse import event, open_stream
from shared.errors import BotlineError, InternalError
from shared.registry import now_ms
from shared.wire import DeltaEvent, EndEvent, Usage

log = structlog.get_logger("botline.gateway.seed")


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


def render_chunk(status: str, text: str, end: EndEvent | None = None) -> dict[str, Any]:
    """One stream event; ``END`` also carries usage and the finish reason."""
    chunk: dict[str, Any] = {
        "status": status,
        "created": now_ms(),
        "choices": {"delta": {"content": text, "role": "assistant"}, "index": 0},
    }
    if end is not None:
        chunk["usage"] = _usage(end.usage)
        chunk["finishReason"] = end.finish_reason
    return chunk


def render_error(error: BotlineError) -> dict[str, Any]:
    """The terminal event of a stream that failed after it started."""
    return {"status": "ERROR", "created": now_ms(), **error.body()}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """The seed's endpoint."""
    chat, run = await open_chat(request)
    async with run:
        if not chat.stream:
            answer = await run.complete()
            return web.Response(
                body=orjson.dumps(render_whole(run.job.job_id, answer)),
                content_type="application/json",
            )
        return await _stream(request, run)


async def _stream(request: web.Request, run: ChatRun) -> web.StreamResponse:
    async with contextlib.aclosing(run.stream()) as events:
        # Errors up to the first event are still real HTTP errors.
        first = await anext(events)
        response = await open_stream(request)
        await _relay(response, first, events)
    await response.write_eof()
    return response


async def _relay(
    response: web.StreamResponse,
    first: DeltaEvent | EndEvent,
    events: AsyncIterator[DeltaEvent | EndEvent],
) -> None:
    try:
        if isinstance(first, EndEvent):
            await response.write(event(render_chunk("START", first.text)))
            await response.write(event(render_chunk("END", "", first)))
        else:
            await response.write(event(render_chunk("START", first.text)))
            async for item in events:
                if isinstance(item, DeltaEvent):
                    await response.write(event(render_chunk("MIDDLE", item.text)))
                else:
                    await response.write(event(render_chunk("END", item.text, item)))
    except BotlineError as exc:
        log.info("stream.failed", code=exc.code)
        await response.write(event(render_error(exc)))
    except (ConnectionError, OSError):
        raise
    except Exception:
        log.exception("stream.crashed")
        await response.write(event(render_error(InternalError("internal error"))))
