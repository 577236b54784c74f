"""Merging a model's tokens into few AMQP messages.

The first piece goes out at once (time to first token is what callers feel);
after it, pieces are merged until ``window_s`` has passed since the first
unsent piece or ``max_chars`` characters are waiting. A reader task pulls from the model
so that a stalled model does not hold back text already received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from services.worker.models import Finish, Piece
from shared.errors import UpstreamError


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


async def coalesce(
    source: AsyncIterator[Piece],
    send_delta: Callable[[str], Awaitable[None]],
    send_end: Callable[[str, Finish], Awaitable[None]],
    *,
    window_s: float,
    max_chars: int,
) -> None:
    """Relay ``source`` to ``send_delta`` calls and one final ``send_end``."""
    queue: asyncio.Queue[Piece | _Failed] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for piece in source:
                queue.put_nowait(piece)
            # Read only if the model forgot its Finish: never hang the caller.
            queue.put_nowait(_Failed(UpstreamError("the answer ended without a finish")))
        except Exception as exc:
            queue.put_nowait(_Failed(exc))

    reader = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    pending: list[str] = []
    size = 0
    flush_at = 0.0
    first = True
    try:
        while True:
            if pending:
                try:
                    async with asyncio.timeout_at(flush_at):
                        item = await queue.get()
                except TimeoutError:
                    await send_delta("".join(pending))
                    pending.clear()
                    size = 0
                    continue
            else:
                item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, Finish):
                await send_end("".join(pending), item)
                return
            if not item:
                continue
            if first:
                first = False
                await send_delta(item)
                continue
            if not pending:
                flush_at = loop.time() + window_s
            pending.append(item)
            size += len(item)
            if size >= max_chars:
                await send_delta("".join(pending))
                pending.clear()
                size = 0
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
