"""``/openai/v1``: the same bots in OpenAI's exact format, for the official SDKs.

``base_url="http://HOST:8080/openai/v1"`` and a bot's API key are all a
client needs. The key's bot is the one model listed, by the bot's id.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from services.gateway.admission import authenticate, chat_session
from services.gateway.chat_run import Answer
from services.gateway.middleware import send_now
from services.gateway.openai_request import parse_openai_request
from services.gateway.sse import event, write_stream
from shared.errors import BotlineError, ModelNotFound
from shared.records import Bot
from shared.wire import DeltaEvent, EndEvent, Usage


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def model_object(bot: Bot) -> dict[str, Any]:
    """A bot as an OpenAI model object."""
    return {
        "id": bot.id,
        "object": "model",
        "created": bot.created_at // 1000,
        "owned_by": "botline",
    }


def render_whole(job_id: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    """A ``chat.completion``."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": answer.text if answer.text or not answer.tool_calls else None,
        "refusal": None,
    }
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {
        "id": job_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": _usage(answer.usage),
    }


class OpenAIStream:
    """``chat.completion.chunk`` events, an optional usage chunk, then ``[DONE]``."""

    def __init__(self, job_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head: dict[str, Any] = {
            "id": job_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        if include_usage:
            self._head["usage"] = None  # as OpenAI does on every chunk but the last
        self._include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return event({**self._head, "choices": [choice]})

    def _deltas(self, item: DeltaEvent) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"content": item.text}] if item.text else []
        return deltas + [{"tool_calls": calls} for calls in item.tool_calls]

    def first(self, item: DeltaEvent) -> bytes:
        """The role goes in the first delta (with ``content: null`` before tool calls)."""
        deltas = self._deltas(item) or [{"content": ""}]
        opening = {"role": "assistant", "content": None} | deltas[0]
        return b"".join(self._chunk(d) for d in [opening, *deltas[1:]])

    def delta(self, item: DeltaEvent) -> bytes:
        """Content, or tool-call chunks exactly as the model sent them."""
        return b"".join(self._chunk(d) for d in self._deltas(item))

    def end(self, item: EndEvent) -> bytes:
        """The last text, the finish reason, usage if asked for, ``[DONE]``."""
        out = self._chunk({"content": item.text}) if item.text else b""
        out += self._chunk({}, item.finish_reason)
        if self._include_usage:
            out += event({**self._head, "choices": [], "usage": _usage(item.usage)})
        return out + b"data: [DONE]\n\n"

    def error(self, error: BotlineError) -> bytes:
        """An ``error`` event; the stream then closes without ``[DONE]``."""
        return event(error.body())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /openai/v1/chat/completions``."""
    async with chat_session(request, parse_openai_request) as session:
        run, created, model = session.run, int(time.time()), session.bot.id
        if session.input.stream:
            renderer = OpenAIStream(run.job.job_id, created, model, session.input.include_usage)
            return await write_stream(request, run, renderer)
        answer = await run.complete()
        # Written before the session settles (services.gateway.middleware.send_now).
        return await send_now(
            request, _json(render_whole(run.job.job_id, created, model, answer), run.headers())
        )


async def list_models(request: web.Request) -> web.Response:
    """``GET /openai/v1/models``: the key's bot."""
    _, bot = await authenticate(request)
    return _json({"object": "list", "data": [model_object(bot)]})


async def get_model(request: web.Request) -> web.Response:
    """``GET /openai/v1/models/{id}``."""
    _, bot = await authenticate(request)
    if request.match_info["model_id"] != bot.id:
        raise ModelNotFound(
            f"the model {request.match_info['model_id']!r} does not exist", param="model"
        )
    return _json(model_object(bot))
