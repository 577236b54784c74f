"""The HTTP server under the app: our own answer to requests aiohttp cannot parse.

A request whose head aiohttp's parser refuses (a header with a control byte,
a line too long, a bad method) never reaches the app or its middleware:
aiohttp answers it from ``RequestHandler.handle_error`` with its parser's
message as the body -- which quotes the offending line, so
``Authorization: Bearer <key>\\x01`` came back with the key in it -- and logs
that line with a traceback. aiohttp 3.14 has no setting for this (issue
aio-libs/aiohttp#9882); the server builds its ``RequestHandler`` in
``web.Server.__call__``, so :class:`GatewayRunner` makes a server whose
handlers answer with our JSON error, quoting nothing, and log the error's
class only.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from services.gateway.security_headers import server_headers
from shared.errors import BotlineError, InternalError, MalformedRequest

log = structlog.get_logger("botline.gateway.http")


def _error_for(status: int) -> BotlineError:
    if 400 <= status < 500:
        # e.g. 431 for headers too large
        return MalformedRequest("the request is malformed", status)
    return InternalError("internal error")


class _Protocol(RequestHandler):
    """aiohttp's per-connection handler, with errors answered and logged our way."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON error that quotes nothing of the request; the connection closes."""
        if status >= 500:
            # Unexpected: keep the traceback (the log redacts anything key-like).
            log.error("http.server_error", status=status, exc_info=exc)
        else:
            # The parser's message quotes the request line or header: name the class only.
            log.warning("http.malformed", status=status, error=type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is dropped")
        error = _error_for(status)
        response = web.Response(
            status=error.status, body=orjson.dumps(error.body()), content_type="application/json"
        )
        server_headers(response)  # the app's on_response_prepare does not run here
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer malformed requests with our JSON errors."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        kwargs: dict[str, Any] = dict(made._kwargs)
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **kwargs,
        )
