"""Fake OpenAI-compatible chat-completions server for tests, manual runs and benchmarks.

Tests start it in-process on the running loop (``async with FakeOpenAI() as up``), script
how each request is answered by pushing :class:`Script` objects, and inspect what our code
sent through :attr:`FakeOpenAI.requests`. Without a script the reply is
``"fake reply to: " + <last user message>``, one chunk per space-separated token.

Standalone: ``python -m tests.support.fake_openai --port 9999 [--delay-ms 5] [--tokens N]
[--rate-limit N/SECONDS]`` serves the default behaviour until SIGINT/SIGTERM; with
``--tokens N`` every reply is exactly N tokens, ``"tok0 tok1 ... tok<N-1>"`` (benchmarks want a
fixed reply length); with ``--rate-limit`` it refuses calls over an account limit, and
``GET /stats`` says how many it accepted and refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

MODEL_ID = "fake-model"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# (type, code) per status, shaped like the errors the real API returns.
_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


@dataclass
class Script:
    """How to answer one request; every field is optional (see the module docstring).

    ``status`` answers that error (with ``retry_after`` as its ``Retry-After``
    header, in seconds); ``stall_s`` holds the response before its first byte
    (headers included) that long. A refused connection is a closed server
    (:meth:`FakeOpenAI.close`).
    """

    tokens: list[str] | None = None
    delay_s: float = 0.0
    hold_after: int | None = None
    status: int | None = None
    # The upstream's own error text with ``status`` (else a generic one).
    error_message: str | None = None
    retry_after: float | None = None
    stall_s: float = 0.0
    include_usage: bool = True
    tool_calls: list[dict[str, Any]] | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Recorded:
    """One request as the server saw it, plus events marking how its response went."""

    body: dict[str, Any]
    headers: dict[str, str]
    # time.monotonic() when the request arrived.
    arrived: float = field(default_factory=time.monotonic)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """Return an OpenAI-style error object for ``status``."""
    kind, code = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {
        "error": {"message": message or f"fake upstream error {status}", "type": kind, "code": code}
    }


def _text_of(content: Any) -> str:
    """Flatten message content: a string, or a list of parts whose text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    return [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []


def default_tokens(body: dict[str, Any]) -> list[str]:
    """Return the default reply's tokens; joined they give the exact reply text."""
    users = [m for m in _messages(body) if m.get("role") == "user"]
    words = ("fake reply to: " + (_text_of(users[-1].get("content")) if users else "")).split(" ")
    return [w + " " for w in words[:-1]] + words[-1:]


def prompt_tokens(body: dict[str, Any]) -> int:
    """Count whitespace-separated words across all messages' content."""
    return sum(len(_text_of(m.get("content")).split()) for m in _messages(body))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


class FakeOpenAI:
    """In-process fake of the OpenAI chat-completions API on loopback."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay_s: float = 0.0,
        record: bool = True,
        tokens: list[str] | None = None,
        rate_limit: tuple[int, float] | None = None,
    ) -> None:
        """``delay_s`` paces unscripted replies; ``record=False`` keeps no history (benchmarks).

        ``tokens``, when given, is every unscripted reply instead of the default one.
        ``rate_limit=(n, window_s)`` behaves like a provider's account limit: a
        request that finds ``n`` others accepted within the last ``window_s``
        (a sliding window) is answered 429 with ``Retry-After``; they are
        counted in :attr:`rate_limited`.
        """
        self._host, self._port = host, port
        self._delay_s = delay_s
        self._tokens = tokens
        self._record = record
        self._runner: web.AppRunner | None = None
        self._scripts: deque[Script] = deque()
        self._arrived = asyncio.Condition()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.requests: list[Recorded] = []
        self._rate_limit = rate_limit
        self._accepted: deque[float] = deque()
        # Calls answered within the rate limit, and those refused 429 (rate_limit only).
        self.accepted = 0
        self.rate_limited = 0
        # Requests being answered now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        """Base URL including ``/v1``, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._runner is None:
            raise RuntimeError("FakeOpenAI is not started")
        return f"http://{self._host}:{self._port}/v1"

    def script(self, script: Script) -> None:
        """Queue ``script`` for the next request not yet answered by an earlier script."""
        self._scripts.append(script)

    async def wait_request(self, n: int = 1, timeout: float = 10) -> Recorded:  # noqa: ASYNC109 -- part of the API tests call
        """Wait until at least ``n`` requests arrived and return the ``n``-th (1-based)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= n)
        return self.requests[n - 1]

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one)."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        # handler_cancellation: a client going away cancels the handler, which is how
        # ``disconnected`` is detected even while we sleep or hold between tokens.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner

    async def close(self) -> None:
        """Stop serving; in-flight (e.g. held) responses are cut off. Idempotent."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        self._closing = True
        # Held handlers would otherwise make aiohttp wait out its shutdown timeout.
        for task in list(self._handlers):
            task.cancel()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _stats(self, request: web.Request) -> web.Response:
        """What a test in another process needs to know: calls answered and refused."""
        return web.json_response({"accepted": self.accepted, "rate_limited": self.rate_limited})

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "botline-tests"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response(error_body(400, "body must be a JSON object"), status=400)
        rec = Recorded(body=body, headers=dict(request.headers))
        rec.started.set()
        if self._record:
            async with self._arrived:
                self.requests.append(rec)
                self._arrived.notify_all()
        script = (
            self._scripts.popleft()
            if self._scripts
            else Script(tokens=self._tokens, delay_s=self._delay_s)
        )
        if script.status is None and self._over_rate_limit():
            script = Script(status=429, retry_after=self._retry_after())
        resp: web.StreamResponse
        if script.status is not None:
            resp = web.json_response(
                error_body(script.status, script.error_message), status=script.status
            )
            if script.retry_after is not None:
                resp.headers["Retry-After"] = f"{script.retry_after:g}"
        elif body.get("stream") is True:
            resp = web.StreamResponse(headers=_SSE_HEADERS)
        else:
            resp = web.Response(content_type="application/json")
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if script.stall_s:
                await asyncio.sleep(script.stall_s)
            if script.status is None:
                await self._generate(request, resp, body, script)
            # Write everything here rather than after returning, so `finished` means sent.
            await resp.prepare(request)
            await resp.write_eof()
            rec.finished.set()
        except asyncio.CancelledError:
            if not self._closing:
                rec.disconnected.set()
            raise
        except ConnectionResetError:
            # The socket closed under a write before aiohttp got to cancel us. Returning
            # (not raising) lets aiohttp hit the dead socket itself and drop it quietly,
            # instead of logging "Error handling request".
            rec.disconnected.set()
        finally:
            self.in_flight -= 1
            self._handlers.discard(task)
        return resp

    def _over_rate_limit(self) -> bool:
        if self._rate_limit is None:
            return False
        limit, window = self._rate_limit
        now = time.monotonic()
        while self._accepted and self._accepted[0] <= now - window:
            self._accepted.popleft()
        if len(self._accepted) >= limit:
            self.rate_limited += 1
            return True
        self._accepted.append(now)
        self.accepted += 1
        return False

    def _retry_after(self) -> float:
        assert self._rate_limit is not None
        return max(0.001, round(self._accepted[0] + self._rate_limit[1] - time.monotonic(), 3))

    async def _generate(
        self, request: web.Request, resp: web.StreamResponse, body: dict[str, Any], script: Script
    ) -> None:
        """Pace out the reply: SSE chunks into ``resp``, or one JSON body at the end."""
        stream = not isinstance(resp, web.Response)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = body.get("model") if isinstance(body.get("model"), str) else MODEL_ID
        head = {"id": cid, "created": created, "model": model, "system_fingerprint": None}
        chunk = {**head, "object": "chat.completion.chunk"}
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        tokens: list[str] = []
        deltas: list[dict[str, Any]]
        if script.tool_calls is not None:
            finish, deltas = "tool_calls", [{"tool_calls": [tc]} for tc in script.tool_calls]
        else:
            tokens = list(script.tokens) if script.tokens is not None else default_tokens(body)
            finish = "stop"
            if isinstance(limit, int) and len(tokens) > limit:
                tokens, finish = tokens[: max(limit, 0)], "length"
            deltas = [{"content": t} for t in tokens]
        sent = len(deltas)
        if stream:
            await resp.prepare(request)
        # An empty reply still needs one chunk to carry the role and finish_reason.
        for i, delta in enumerate(deltas or [{"content": ""}]):
            if i == script.hold_after:
                await script.release.wait()
            if script.delay_s > 0:
                await asyncio.sleep(script.delay_s)
            if stream:
                choice = {
                    "index": 0,
                    "delta": {"role": "assistant", **delta} if i == 0 else delta,
                    "logprobs": None,
                    "finish_reason": finish if i >= sent - 1 else None,
                }
                await resp.write(_sse({**chunk, "choices": [choice]}))
        if script.hold_after is not None and script.hold_after >= max(sent, 1):
            await script.release.wait()
        p = prompt_tokens(body)
        usage = {"prompt_tokens": p, "completion_tokens": sent, "total_tokens": p + sent}
        if stream:
            opts = body.get("stream_options")
            wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if script.include_usage and wants_usage:
                await resp.write(_sse({**chunk, "choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            return
        assert isinstance(resp, web.Response)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens)}
        if script.tool_calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": script.tool_calls}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        payload: dict[str, Any] = {**head, "object": "chat.completion", "choices": [choice]}
        if script.include_usage:
            payload["usage"] = usage
        resp.body = _json(payload)


def numbered_tokens(n: int) -> list[str]:
    """``n`` tokens that join to ``"tok0 tok1 ... tok<n-1>"``, like the default reply's."""
    words = [f"tok{i}" for i in range(n)]
    return [w + " " for w in words[:-1]] + words[-1:]


async def _serve(
    host: str,
    port: int,
    delay_s: float,
    tokens: list[str] | None,
    rate_limit: tuple[int, float] | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # record=False: a long benchmark run must not keep every request body in memory.
    async with FakeOpenAI(
        host=host, port=port, delay_s=delay_s, record=False, tokens=tokens, rate_limit=rate_limit
    ) as up:
        print(f"fake OpenAI serving on {up.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Serve the default behaviour until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_openai", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="sleep before each token")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help='every reply is exactly N tokens, "tok0 tok1 ..." (default: echo the user)',
    )
    parser.add_argument(
        "--rate-limit",
        default=None,
        metavar="N/SECONDS",
        help="answer 429 (with Retry-After) to a call that finds N others in the last SECONDS",
    )
    args = parser.parse_args(argv)
    rate_limit = None
    if args.rate_limit is not None:
        count, _, window = args.rate_limit.partition("/")
        rate_limit = (int(count), float(window))
    if args.tokens is not None and args.tokens < 1:
        parser.error("--tokens must be at least 1")
    tokens = numbered_tokens(args.tokens) if args.tokens is not None else None
    asyncio.run(_serve(args.host, args.port, args.delay_ms / 1000, tokens, rate_limit))


if __name__ == "__main__":
    main()
