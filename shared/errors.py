"""The one exception hierarchy; the gateway maps it to HTTP in one middleware.

Each error has an HTTP status, a stable machine-readable ``code`` and an
OpenAI-style ``type``. Workers send errors to the gateway by code
(:func:`error_from_code`), so both ends agree on what a code means.
"""

from __future__ import annotations

import math
from typing import ClassVar


class BotlineError(Exception):
    """Base of every error a caller may see."""

    # A class default; only :class:`HttpError` sets it per instance.
    status: int = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    # Seconds a client should wait before retrying; sent as Retry-After.
    retry_after: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        """The JSON error body both surfaces use."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(BotlineError):
    """The body is not JSON or fails validation."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class RequestTooLarge(BotlineError):
    """The body is over the size limit."""

    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class NotFound(BotlineError):
    """No such route."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class MethodNotAllowed(BotlineError):
    """The route exists, the method does not."""

    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class InvalidApiKey(BotlineError):
    """No key, a malformed key or an unknown key."""

    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class ApiKeyDisabled(BotlineError):
    """The key exists but was disabled."""

    status = 401
    code = "api_key_disabled"
    type = "authentication_error"


class ApiKeyExpired(BotlineError):
    """The key exists but is past its expiry."""

    status = 401
    code = "api_key_expired"
    type = "authentication_error"


class ApiKeyRevoked(BotlineError):
    """The key was revoked while a request of it was in flight (later: unknown key)."""

    status = 401
    code = "api_key_revoked"
    type = "authentication_error"


class BotNotFound(BotlineError):
    """The key's bot no longer exists."""

    status = 404
    code = "bot_not_found"
    type = "not_found_error"


class BackendUnavailable(BotlineError):
    """Redis or RabbitMQ cannot be reached."""

    status = 503
    code = "backend_unavailable"
    type = "server_error"
    retry_after = 1


class Overloaded(BotlineError):
    """The job queue is full."""

    status = 503
    code = "overloaded"
    type = "server_error"
    retry_after = 1


class DeadlineExceeded(BotlineError):
    """No answer within the request deadline."""

    status = 504
    code = "deadline_exceeded"
    type = "timeout_error"


class UpstreamError(BotlineError):
    """The model endpoint failed or answered an error.

    ``retryable``: the failure says nothing against another endpoint (no
    connection, no first byte in time, 429, 5xx), so before the first delta
    the worker moves on to the bot's next endpoint. ``retry_after_s`` is the
    upstream's ``Retry-After``; ``rate_limited`` marks its 429.
    """

    status = 502
    code = "upstream_error"
    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        upstream_status: str = "error",
        param: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(message, param=param)
        # How it failed, for the worker's metrics: the upstream's HTTP status,
        # or timeout, connection, malformed, stream (never sent to the caller).
        self.upstream_status = upstream_status
        # Whether the next endpoint of the bot may be tried (before any delta).
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.rate_limited = rate_limited


class UpstreamUnavailable(BotlineError):
    """Every endpoint of the bot is cooling down, paused or out of fleet capacity
    for longer than the request can wait."""

    status = 503
    code = "upstream_unavailable"
    type = "server_error"
    retry_after = 1


class UnknownEndpoint(BotlineError):
    """The bot names a model endpoint the workers do not know."""

    status = 502
    code = "unknown_endpoint"
    type = "server_error"


class WorkerLost(BotlineError):
    """The worker died after the answer had started; it cannot be resumed."""

    status = 502
    code = "worker_lost"
    type = "server_error"


class JobFailed(BotlineError):
    """The job was dead-lettered after failing on too many workers."""

    status = 502
    code = "job_failed"
    type = "server_error"


class InternalError(BotlineError):
    """Anything unexpected."""


class MalformedRequest(InvalidRequest):
    """A request aiohttp could not parse (a bad header byte, headers too large).

    Its status is aiohttp's (400, 431, ...); its message quotes nothing of the request.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HttpError(InternalError):
    """An HTTP error aiohttp raised itself, none of the above: its status is kept."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(BotlineError):
    """A key over one of its limits."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_ms: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after_ms / 1000))
        self.headers = headers


class AdminUnauthorized(BotlineError):
    """No valid admin token (or the admin API is off)."""

    status = 401
    code = "invalid_admin_token"
    type = "authentication_error"


class ModelNotFound(NotFound):
    """Not the key's bot (the OpenAI surface's ``/models/{id}``)."""

    code = "model_not_found"


class UnsupportedParameter(InvalidRequest):
    """A parameter botline cannot honour."""

    code = "unsupported_parameter"


_BY_CODE: dict[str, type[BotlineError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        RequestTooLarge,
        NotFound,
        MethodNotAllowed,
        InvalidApiKey,
        ApiKeyDisabled,
        ApiKeyExpired,
        ApiKeyRevoked,
        BotNotFound,
        BackendUnavailable,
        Overloaded,
        DeadlineExceeded,
        UpstreamError,
        UpstreamUnavailable,
        UnknownEndpoint,
        WorkerLost,
        JobFailed,
        InternalError,
    )
}


def error_from_code(code: str, message: str) -> BotlineError:
    """The error a worker reported by code; unknown codes become internal errors."""
    return _BY_CODE.get(code, InternalError)(message)
