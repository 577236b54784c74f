"""Model endpoints: the built-in echo model and any OpenAI-compatible server.

A model turns a job into an async stream of text pieces ending with one
:class:`Finish` (finish reason and usage). Errors are raised as
:mod:`shared.errors` exceptions; cancelling the stream closes the upstream
connection, which is how a caller who went away stops the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog

from services.worker.settings import EndpointConfig
from services.worker.upstream_http import ConnectionFailed, HTTPPool, Response
from shared import tokens
from shared.errors import UpstreamError
from shared.wire import ChatJob, Usage

log = structlog.get_logger("botline.worker.endpoints")


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of an answer."""

    finish_reason: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class ToolCallChunk:
    """One upstream chunk's ``delta.tool_calls``, kept exactly as sent."""

    calls: list[dict[str, Any]]


class Breath:
    """Marks the end of what one paced read brought: whatever is waiting is sent now."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BREATH"


BREATH = Breath()

Piece = str | ToolCallChunk | Finish | Breath

# How a stream is paced: the seconds to wait between two reads of it, asked
# after each read (None: read as soon as anything arrives).
Pace = Callable[[], float]


class Model(Protocol):
    """What the worker needs of a model endpoint."""

    def stream(self, job: ChatJob, pace: Pace | None = None) -> AsyncIterator[Piece]:
        """The answer to a job, piece by piece, then a :class:`Finish`.

        With ``pace``, a model that reads a network stream may read it at most
        once per ``pace()`` seconds after the first text, and yields
        :data:`BREATH` after the pieces of each read.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


_WORD = re.compile(r"\S+\s*")


class EchoModel:
    """Repeats the last user message word by word: deterministic, no network."""

    def __init__(self, config: EndpointConfig) -> None:
        self._delay_s = config.delay_ms / 1000

    async def stream(self, job: ChatJob, pace: Pace | None = None) -> AsyncIterator[Piece]:
        """Echo the last user message, at most ``max_tokens`` words (no pacing)."""
        last = next((m.text for m in reversed(job.messages) if m.role == "user"), "")
        words = _WORD.findall(last)
        finish = "stop"
        if len(words) > job.max_tokens:
            words, finish = words[: job.max_tokens], "length"
        for word in words:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            yield word
        usage = Usage(
            prompt_tokens=tokens.estimate_prompt(job.messages), completion_tokens=len(words)
        )
        yield Finish(finish, usage)

    async def close(self) -> None:
        """Nothing to release."""


class OpenAIModel:
    """Streams from an OpenAI-compatible ``/chat/completions``."""

    def __init__(self, config: EndpointConfig) -> None:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        if api_key:
            headers["Authorization"] = f"Bearer {api_key.strip()}"
        # A pause between paced reads is kept well inside the silence bound.
        self._max_pause_s = config.timeout_s / 4
        self._pool: HTTPPool | None = None
        try:
            # The read timeout bounds the silence between two chunks, not the whole answer.
            self._pool = HTTPPool(
                config.base_url.rstrip("/") + "/chat/completions",
                headers,
                limit=config.max_concurrency,
                connect_timeout_s=min(config.timeout_s, 10.0),
                read_timeout_s=config.timeout_s,
            )
        except ValueError as exc:
            # Said once here, in the worker's log (no URL: it may carry a credential);
            # each call then fails, not the worker.
            log.error(
                "endpoint.misconfigured", error=str(exc), api_key_env=config.api_key_env or None
            )

    def _payload(self, job: ChatJob) -> bytes:
        body: dict[str, Any] = {
            **job.params,
            "model": job.model,
            "messages": [m.upstream() for m in job.messages],
            "temperature": job.temperature,
            "top_p": job.top_p,
            "max_tokens": job.max_tokens,
            "stream": job.stream,
        }
        if job.stream:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def stream(self, job: ChatJob, pace: Pace | None = None) -> AsyncIterator[Piece]:
        """Call the upstream and yield its content deltas.

        A whole answer is asked for whole: one JSON body to parse instead of
        an event per token, and nothing to relay before it is done anyway.
        A stream is read as soon as its first text can be, then, with
        ``pace``, once per ``pace()`` seconds (see :func:`_reads`).
        """
        if self._pool is None:
            # The details are in the worker's log, not for the caller.
            raise UpstreamError("the model endpoint is misconfigured", upstream_status="connection")
        try:
            response = await self._pool.post(self._payload(job))
            try:
                if response.status != 200:
                    status = response.status
                    raise UpstreamError(
                        await _error_message(response),
                        upstream_status=str(status),
                        retryable=status == 429 or status >= 500,
                        retry_after_s=retry_after(response.headers),
                        rate_limited=status == 429,
                    )
                if job.stream:
                    async for piece in _parse_stream(response, job, pace, self._max_pause_s):
                        yield piece
                else:
                    for piece in _parse_whole(await response.read(), job):
                        yield piece
            finally:
                # Kept alive only if read to its end; a caller who went away closes it.
                response.release()
        except ConnectionFailed as exc:
            raise UpstreamError(
                f"the model endpoint failed: {exc}", upstream_status="connection", retryable=True
            ) from exc
        except TimeoutError as exc:
            raise UpstreamError(
                "the model endpoint stopped answering", upstream_status="timeout", retryable=True
            ) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.close()


# What a caller reads per upstream status: our words, never the upstream's,
# whose text can quote the operator's own credentials or internals.
_REFUSED = "the model endpoint refused the request"

# Anything that looks like a credential in an upstream's error text.
_KEY_LIKE = re.compile(
    r"(?i:bearer|basic)\s+\S+"  # an Authorization header's value
    r"|\b(?:sk|bl|pk|rk)-[\w*\-]+"  # provider and botline keys (sk-proj-..., bl-...)
    r"|\b(?=\w*\d)(?=\w*[A-Za-z])\w{20,}"  # long hex / base62 tokens
)


def mask_secrets(text: str) -> str:
    """``text`` with anything key-like replaced by ``***``."""
    return _KEY_LIKE.sub("***", text)


def caller_message(status: int) -> str:
    """What a caller is told of an upstream's non-200 answer: its status class, in our words."""
    if status == 429:
        return f"the model endpoint is rate limiting botline ({status})"
    if 400 <= status < 500:
        return f"{_REFUSED} ({status})"
    return f"the model endpoint failed ({status})"


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The upstream's ``Retry-After`` (or ``retry-after-ms``) in seconds, if it sent one."""
    millis = headers.get("retry-after-ms")
    with contextlib.suppress(ValueError):
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    value = headers.get("Retry-After")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


async def _error_message(response: Response) -> str:
    """Our message for the caller; the upstream's own text is logged here, masked."""
    detail: str | None = None
    try:
        data = orjson.loads(await response.read(4096))
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if isinstance(message, str):
            detail = mask_secrets(message[:300])
    except (orjson.JSONDecodeError, AttributeError, ConnectionFailed, TimeoutError):
        pass
    log.warning("upstream.refused", status=response.status, upstream_message=detail)
    return caller_message(response.status)


def _parse_whole(data: bytes, job: ChatJob) -> list[Piece]:
    try:
        body = orjson.loads(data)
        choice = body["choices"][0]
        message = choice.get("message") or {}
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamError(
            "the model endpoint sent a malformed answer", upstream_status="malformed"
        ) from exc
    pieces: list[Piece] = []
    text = message.get("content") or ""
    if text:
        pieces.append(text)
    if message.get("tool_calls"):
        # As one streamed chunk: whole calls, each with its position as index.
        calls = [{"index": i} | call for i, call in enumerate(message["tool_calls"])]
        pieces.append(ToolCallChunk(calls))
    usage = _usage(body.get("usage"), job, [text])
    pieces.append(Finish(choice.get("finish_reason") or "stop", usage))
    return pieces


def _usage(reported: object, job: ChatJob, completion: list[str]) -> Usage:
    """The upstream's own token counts if it sent them, else our estimate."""
    if isinstance(reported, dict):
        return Usage(
            prompt_tokens=int(reported.get("prompt_tokens") or 0),
            completion_tokens=int(reported.get("completion_tokens") or 0),
        )
    return Usage(
        prompt_tokens=tokens.estimate_prompt(job.messages),
        completion_tokens=tokens.estimate("".join(completion)),
    )


async def _reads(
    response: Response, paced: Callable[[], float | None]
) -> AsyncIterator[list[bytes]]:
    """The payloads of an event stream's ``data:`` lines, a list per read, up to ``[DONE]``.

    A read takes whatever has arrived (often several events at once) rather
    than awaiting line by line. When ``paced()`` gives a number of seconds,
    the connection is paused that long before the next read: the kernel
    holds the tokens meanwhile, and the next read takes them all in one
    wake-up of this task (at 200 tokens a second per stream and a thousand
    streams, reading each token as it came was most of the worker's CPU).
    Pacing costs a token no more delay than the coalescing window it is
    sent in anyway.
    """
    rest = b""
    while True:
        chunk = await response.readany()
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        found: list[bytes] = []
        for raw in lines:
            if not raw.startswith(b"data:"):
                continue
            data = raw[5:].strip()
            if data == b"[DONE]":
                if found:
                    yield found
                return
            found.append(data)
        if found:
            yield found
        pause_s = paced()
        if pause_s:
            response.pause_reading()
            try:
                await asyncio.sleep(pause_s)
            finally:
                response.resume_reading()
    if rest.startswith(b"data:") and rest[5:].strip() not in (b"", b"[DONE]"):
        yield [rest[5:].strip()]


async def _parse_stream(
    response: Response,
    job: ChatJob,
    pace: Pace | None = None,
    max_pause_s: float = 1.0,
) -> AsyncIterator[Piece]:
    finish_reason = "stop"
    reported: object = None
    completion_chars: list[str] = []

    def paced() -> float | None:
        # Never before the first text: time to first token is what callers feel.
        return min(pace(), max_pause_s) if pace is not None and completion_chars else None

    async for batch in _reads(response, paced):
        for data in batch:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise UpstreamError(
                    "the model endpoint sent a malformed event", upstream_status="malformed"
                ) from exc
            if chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else None
                log.warning(
                    "upstream.failed_mid_answer",
                    upstream_message=(
                        mask_secrets(message[:300]) if isinstance(message, str) else None
                    ),
                )
                raise UpstreamError(
                    "the model endpoint failed mid-answer", upstream_status="stream"
                )
            if chunk.get("usage"):
                reported = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    completion_chars.append(text)
                    yield text
                if delta.get("tool_calls"):
                    yield ToolCallChunk(delta["tool_calls"])
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        if pace is not None and completion_chars:
            yield BREATH
    yield Finish(finish_reason, _usage(reported, job, completion_chars))


def make_model(config: EndpointConfig) -> Model:
    """The model for an endpoint's kind."""
    if config.kind == "echo":
        return EchoModel(config)
    return OpenAIModel(config)
