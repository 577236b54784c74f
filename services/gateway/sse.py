"""Server-sent events: write a run's events to the caller through a surface's renderer.

Both surfaces stream the same way -- errors before the first event are HTTP
errors, after it one terminal error event -- and differ only in how an event
is written, which is what a :class:`StreamRenderer` says.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import web

from services.gateway.chat_run import ChatRun
from services.gateway.resources import RESPONSE, STREAM_ERROR, gateway_of
from shared.errors import BotlineError, InternalError
from shared.wire import DeltaEvent, EndEvent

log = structlog.get_logger("botline.gateway.sse")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tell nginx and friends not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class StreamRenderer(Protocol):
    """How one surface writes a stream; each method returns the bytes to send."""

    def first(self, item: DeltaEvent) -> bytes:
        """The opening of the stream, with the first piece."""
        ...

    def delta(self, item: DeltaEvent) -> bytes:
        """A later piece of the answer."""
        ...

    def end(self, item: EndEvent) -> bytes:
        """The end of the answer, and of the stream."""
        ...

    def error(self, error: BotlineError) -> bytes:
        """The one terminal event of a stream that failed after it started."""
        ...


async def write_stream(
    request: web.Request, run: ChatRun, render: StreamRenderer
) -> web.StreamResponse:
    """Stream a run's answer to the caller."""
    async with contextlib.aclosing(run.stream()) as events:
        # Errors up to the first event are still real HTTP errors.
        first = await anext(events)
        response = web.StreamResponse(status=200, headers=SSE_HEADERS | run.headers())
        request[RESPONSE] = response
        await response.prepare(request)
        streams_open = gateway_of(request).metrics.streams_open
        streams_open.inc()
        try:
            if isinstance(first, EndEvent):
                # A one-piece answer: its text opens the stream, an empty end closes it.
                opening = DeltaEvent(
                    job_id=first.job_id, attempt=first.attempt, seq=first.seq, text=first.text
                )
                await response.write(render.first(opening))
                await response.write(render.end(first.model_copy(update={"text": ""})))
            else:
                chunk = render.first(first)
                # No event is held while the stream waits for the next: an open
                # stream's memory is per-stream state, not its last piece.
                del first
                await response.write(chunk)
                async for item in events:
                    chunk = render.delta(item) if isinstance(item, DeltaEvent) else render.end(item)
                    del item
                    await response.write(chunk)
        except BotlineError as exc:
            log.info("stream.failed", code=exc.code)
            request[STREAM_ERROR] = exc.code
            await response.write(render.error(exc))
        except (ConnectionError, OSError):
            raise
        except Exception:
            log.exception("stream.crashed")
            crash = InternalError("internal error")
            request[STREAM_ERROR] = crash.code
            await response.write(render.error(crash))
        finally:
            streams_open.dec()
    await response.write_eof()
    return response
