"""The worker's delta coalescing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.worker.coalesce import coalesce
from services.worker.endpoints import BREATH, Finish, Piece, ToolCallChunk
from shared.errors import UpstreamError
from shared.wire import Usage

FINISH = Finish("stop", Usage(prompt_tokens=1, completion_tokens=3))


class Recorder:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.end: tuple[str, Finish] | None = None
        self.first_sent = asyncio.Event()

    async def delta(self, text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        self.deltas.append(text or f"<{len(tool_calls)} tool chunks>")
        self.first_sent.set()

    async def finish(self, text: str, finish: Finish) -> None:
        self.end = (text, finish)


async def pieces(items: list[Piece], gate: asyncio.Event | None = None) -> AsyncIterator[Piece]:
    for i, item in enumerate(items):
        if gate is not None and i == 1:
            await gate.wait()
        yield item


async def test_first_piece_goes_alone_then_the_rest_is_merged() -> None:
    out = Recorder()
    items: list[Piece] = ["a", "b", "c", "d", FINISH]
    await coalesce(pieces(items), out.delta, out.finish, window_s=10, max_chars=100)
    assert out.deltas == ["a"]
    assert out.end == ("bcd", FINISH)


async def test_size_window_flushes() -> None:
    out = Recorder()
    items: list[Piece] = ["x", "aa", "bb", "cc", FINISH]
    await coalesce(pieces(items), out.delta, out.finish, window_s=10, max_chars=4)
    assert out.deltas == ["x", "aabb"]
    assert out.end == ("cc", FINISH)


async def test_a_stalled_model_does_not_hold_back_received_text() -> None:
    out = Recorder()
    gate = asyncio.Event()
    items: list[Piece] = ["first", "second", FINISH]
    task = asyncio.create_task(
        coalesce(pieces(items, gate), out.delta, out.finish, window_s=0.01, max_chars=100)
    )
    await out.first_sent.wait()
    gate.set()
    await task
    assert "".join(out.deltas) + (out.end[0] if out.end else "") == "firstsecond"


async def test_time_window_flushes_while_the_model_pauses() -> None:
    out = Recorder()
    hold = asyncio.Event()

    async def source() -> AsyncIterator[Piece]:
        yield "one"
        yield "two"
        await hold.wait()  # the model pauses; "two" must still go out
        yield FINISH

    second = asyncio.Event()

    async def delta(text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        await out.delta(text, tool_calls)
        if len(out.deltas) == 2:
            second.set()

    task = asyncio.create_task(coalesce(source(), delta, out.finish, window_s=0.01, max_chars=100))
    async with asyncio.timeout(5):
        await second.wait()
    assert out.deltas == ["one", "two"]
    hold.set()
    await task
    assert out.end == ("", FINISH)


async def test_model_errors_propagate() -> None:
    out = Recorder()

    async def failing() -> AsyncIterator[Piece]:
        yield "a"
        raise UpstreamError("boom")

    with pytest.raises(UpstreamError):
        await coalesce(failing(), out.delta, out.finish, window_s=0.01, max_chars=100)


async def test_a_source_without_finish_is_an_error_not_a_hang() -> None:
    out = Recorder()
    with pytest.raises(UpstreamError):
        await coalesce(pieces(["a", "b"]), out.delta, out.finish, window_s=0.01, max_chars=100)


async def test_text_and_tool_chunks_keep_their_order_and_boundaries() -> None:
    out = Recorder()
    call = {"index": 0, "function": {"arguments": "{}"}}
    items: list[Piece] = ["a", "b", ToolCallChunk([call]), ToolCallChunk([call]), "c", FINISH]
    await coalesce(pieces(items), out.delta, out.finish, window_s=10, max_chars=100)
    assert out.deltas == ["a", "b", "<2 tool chunks>"]
    assert out.end == ("c", FINISH)


async def test_a_slow_timed_flush_is_never_overtaken_by_the_end() -> None:
    sent: list[str] = []
    slow = asyncio.Event()
    window_passed = asyncio.Event()

    async def delta(text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        if text == "b":
            window_passed.set()
            await slow.wait()  # the timed flush of "b" is still being sent...
        sent.append(text)

    async def finish(text: str, finish: Finish) -> None:
        sent.append(f"end:{text}")

    async def source() -> AsyncIterator[Piece]:
        yield "a"
        yield "b"
        await window_passed.wait()
        yield "c"  # ...when more text and the end arrive
        yield FINISH

    task = asyncio.create_task(coalesce(source(), delta, finish, window_s=0.01, max_chars=100))
    async with asyncio.timeout(5):
        await window_passed.wait()
    await asyncio.sleep(0.02)
    slow.set()
    await task
    assert sent == ["a", "b", "end:c"]


async def test_nothing_is_sent_after_a_model_error() -> None:
    sent: list[str] = []

    async def delta(text: str, tool_calls: list[list[dict[str, Any]]]) -> None:
        sent.append(text)

    async def failing() -> AsyncIterator[Piece]:
        yield "a"
        yield "b"  # waits for its window...
        raise UpstreamError("boom")  # ...which never ends: the error comes first

    with pytest.raises(UpstreamError):
        await coalesce(failing(), delta, Recorder().finish, window_s=0.05, max_chars=100)
    await asyncio.sleep(0.1)
    assert sent == ["a"]


async def test_a_breath_sends_what_a_paced_read_brought() -> None:
    out = Recorder()
    items: list[Piece] = ["a", "b", "c", BREATH, "d", "e", BREATH, BREATH, "f", FINISH]
    await coalesce(pieces(items), out.delta, out.finish, window_s=10, max_chars=100)
    # The first piece at once; then each read's pieces as one delta, not at the window's end.
    assert out.deltas == ["a", "bc", "de"]
    assert out.end == ("f", FINISH)
