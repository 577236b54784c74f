"""Merging a model's tokens into few AMQP messages.

For a stream the first piece goes out at once (time to first token is what
callers feel); after it, pieces are merged until ``window_s`` has passed since the first
unsent piece or ``max_chars`` characters are waiting. Text and tool-call
chunks are never merged into one event, so their order is kept. A reader task
pulls from the model, so that a stalled model does not hold back text
already received.

A whole (non-stream) answer needs no early piece: it is merged into as few
events as possible, one per ``window_s`` at most, which then serve only to
show the gateway that the worker is alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.worker.models import Finish, Piece, ToolCallChunk
from shared.errors import UpstreamError

ToolCalls = list[list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


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
    """Relay ``source`` to ``send_delta`` calls and one final ``send_end``.

    ``window_s`` may be a function, asked each time a new window opens, so
    that a busy worker can widen its windows (see ``Worker``).
    """
    window = window_s if callable(window_s) else (lambda: window_s)
    queue: asyncio.Queue[Piece | _Failed] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for piece in source:
                queue.put_nowait(piece)
            # Read only if the model forgot its Finish: never hang the caller.
            queue.put_nowait(_Failed(UpstreamError("the answer ended without a finish")))
        except Exception as exc:
            queue.put_nowait(_Failed(exc))

    async def flush() -> None:
        await send_delta(*pending.take())

    reader = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    pending = _Pending()
    flush_at = 0.0
    first = first_at_once
    try:
        while True:
            if not queue.empty():
                item = queue.get_nowait()  # no timer needed for what is already here
            elif pending:
                try:
                    async with asyncio.timeout_at(flush_at):
                        item = await queue.get()
                except TimeoutError:
                    await flush()
                    continue
            else:
                item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, Finish):
                if pending.tools:
                    await flush()
                await send_end(pending.take()[0], item)
                return
            if not item:
                continue
            if pending and not pending.fits(item):
                await flush()
            if not pending:
                flush_at = loop.time() + window()
            pending.add(item)
            if first or pending.size >= max_chars:
                first = False
                await flush()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
