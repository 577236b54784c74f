"""Merging a model's tokens into few AMQP messages.

For a stream the first piece goes out at once (time to first token is what
callers feel); after it, pieces are merged until ``window_s`` has passed since the first
unsent piece or ``max_chars`` characters are waiting. Text and tool-call
chunks are never merged into one event, so their order is kept. A timer
sends what is waiting when a window ends while the model is quiet, so a
stalled model does not hold back text already received.

A whole (non-stream) answer needs no early piece: it is merged into as few
events as possible, one per ``window_s`` at most, which then serve only to
show the gateway that the worker is alive.

A model that reads its stream in paced reads marks the end of each read
with :data:`BREATH`: what is waiting is sent then, since it has already
waited for the read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.worker.endpoints import Breath, Finish, Piece, ToolCallChunk
from shared.errors import UpstreamError

ToolCalls = list[list[dict[str, Any]]]


class _Pending:
    """What is waiting to be sent: text or tool-call chunks, never both."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tools: ToolCalls = []
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.text or self.tools)

    def fits(self, piece: str | ToolCallChunk) -> bool:
        return not (self.tools if isinstance(piece, str) else self.text)

    def add(self, piece: str | ToolCallChunk) -> None:
        if isinstance(piece, str):
            self.text.append(piece)
            self.size += len(piece)
        else:
            self.tools.append(piece.calls)
            self.size += 64

    def take(self) -> tuple[str, ToolCalls]:
        out = "".join(self.text), self.tools
        self.text, self.tools, self.size = [], [], 0
        return out


async def coalesce(
    source: AsyncIterator[Piece],
    send_delta: Callable[[str, ToolCalls], Awaitable[None]],
    send_end: Callable[[str, Finish], Awaitable[None]],
    *,
    window_s: float | Callable[[], float],
    max_chars: int,
    first_at_once: bool = True,
) -> None:
    """JobClient ``source`` to ``send_delta`` calls and one final ``send_end``.

    ``window_s`` may be a function, asked each time a new window opens, so
    that a busy worker can widen its windows (see ``Worker``).

    The task that reads the model also sends, so a piece costs no task
    switch and no timer; only a window that ends while the model is quiet
    starts a timer, whose flush runs as a task of its own. A lock keeps
    sends in order, and nothing is sent after this returns or raises.
    """
    window = window_s if callable(window_s) else (lambda: window_s)
    loop = asyncio.get_running_loop()
    pending = _Pending()
    sending = asyncio.Lock()
    timer: asyncio.TimerHandle | None = None
    late: set[asyncio.Task[None]] = set()  # timed flushes, held until done
    closed = False

    async def flush() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        async with sending:
            if pending and not closed:
                await send_delta(*pending.take())

    def window_ended() -> None:
        nonlocal timer
        timer = None
        task = asyncio.create_task(flush())
        late.add(task)
        task.add_done_callback(late.discard)

    first = first_at_once
    try:
        async for item in source:
            if isinstance(item, Finish):
                if pending.tools:
                    await flush()
                if timer is not None:
                    timer.cancel()
                    timer = None
                async with sending:
                    closed = True
                    await send_end(pending.take()[0], item)
                return
            if isinstance(item, Breath):
                if pending:
                    await flush()
                continue
            if not item:
                continue
            if pending and not pending.fits(item):
                await flush()
            if not pending:
                timer = loop.call_at(loop.time() + window(), window_ended)
            pending.add(item)
            if first or pending.size >= max_chars:
                first = False
                await flush()
        # Only if the model forgot its Finish: never hang the caller.
        raise UpstreamError("the answer ended without a finish")
    finally:
        closed = True
        if timer is not None:
            timer.cancel()
        # A timed flush under way finishes first (no gap in the events); one
        # not yet started sends nothing now.
        async with sending:
            pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
