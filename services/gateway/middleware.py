"""The edge of every request: a request id, one log line, errors mapped to HTTP.

Errors raised before a response started become ``{"error": {...}}`` bodies
with a real status code; anything unexpected is logged with its traceback and
answered 500 without one.
"""

from __future__ import annotations

import re
import secrets
import time

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from services.gateway.metrics import surface_of
from services.gateway.resources import (
    BOT_ID,
    GATEWAY,
    RATE_HEADERS,
    REQUEST_ID,
    RESPONSE,
    STARTED,
    STREAM,
    STREAM_ERROR,
)
from shared.errors import (
    BotlineError,
    HttpError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
)

log = structlog.get_logger("botline.gateway.http")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The status logged when the caller went away before the answer was complete.
CLIENT_CLOSED = 499


def error_response(error: BotlineError) -> web.Response:
    """The HTTP response for an error."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return web.Response(
        status=error.status,
        body=orjson.dumps(error.body()),
        content_type="application/json",
        headers=headers,
    )


async def send_now(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Write a whole response now, rather than once the handler and this middleware are
    done: what they still do (settling the request's usage and limits, the log line,
    the metrics) is then off the caller's path. Returns it, for the handler to return;
    aiohttp then has nothing left to write. Raises ``ConnectionError`` if the caller
    is gone."""
    request[RESPONSE] = response
    await response.prepare(request)
    await response.write_eof()
    return response


def _from_http_exception(exc: web.HTTPException) -> BotlineError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("the body is too large")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"method {exc.method} is not allowed here")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint")
    return HttpError(exc.reason, exc.status)


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, access log line and error mapping; the response is written before
    the line (:func:`send_now`)."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID_OK.match(given) else "req_" + secrets.token_hex(12)
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    request[STARTED] = started
    status = 500
    code: str | None = None
    try:
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                raise _from_http_exception(exc) from exc
            status = response.status
            # A stream that failed after its 200: the line carries the error it ended with.
            code = request.get(STREAM_ERROR)
        except BotlineError as exc:
            status, code = exc.status, exc.code
            response = error_response(exc)
        except ConnectionError:
            # The caller went away (while we read its body, or as its answer was
            # written): nobody to answer, nothing to report (aiohttp drops a
            # response for a closed connection).
            status = CLIENT_CLOSED
            gone: web.StreamResponse | None = request.get(RESPONSE)
            return gone if gone is not None else web.Response(status=CLIENT_CLOSED)
        except BaseException as exc:
            if isinstance(exc, web.HTTPException):
                status = exc.status
                raise
            if not isinstance(exc, Exception):
                status = CLIENT_CLOSED  # cancelled: the caller disconnected
                raise
            log.exception("http.unhandled")
            response = error_response(InternalError("internal error"))
        sent: web.StreamResponse | None = request.get(RESPONSE)
        if sent is not None and sent is not response:
            # An error after the head went out (settling the request, say): the
            # caller has what it was sent; the line tells the error, and no second
            # response follows on the connection.
            status = sent.status
            return sent
        if not response.prepared:
            try:
                await send_now(request, response)
            except ConnectionError:
                status = CLIENT_CLOSED
        return response
    finally:
        elapsed = time.perf_counter() - started
        log.info(
            "http.request",
            method=request.method,
            path=request.path,
            status=status,
            code=code,
            ms=round(elapsed * 1000, 2),
        )
        gateway = request.app.get(GATEWAY)
        if gateway is not None:
            gateway.metrics.request(
                surface_of(request.path),
                status,
                code or request.get(STREAM_ERROR),
                request.get(STREAM, False),
                elapsed,
                request.get(BOT_ID),
            )


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams and errors included, carries its
    request id and, for a key with limits, the rate-limit headers."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    rate_headers = request.get(RATE_HEADERS)
    if rate_headers:
        response.headers.update(rate_headers)
