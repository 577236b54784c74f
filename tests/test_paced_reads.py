"""Paced reads of a streamed answer: the worker reads an upstream stream at most once per
window after its first text, and loses nothing while the connection is paused.

The upstream is the in-process fake on loopback; no Redis or RabbitMQ is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import NamedTuple

import pytest

from services.worker.endpoints import BREATH, Finish, OpenAIModel, Piece
from services.worker.settings import EndpointConfig
from services.worker.upstream_http import _Connection
from shared.errors import UpstreamError
from shared.wire import ChatJob
from tests.support.fake_openai import FakeOpenAI, Script, numbered_tokens
from tests.support.samples import JOB


def _job() -> ChatJob:
    return JOB.model_copy(update={"endpoint": "fake", "max_tokens": 1000, "stream": True})


class _Answer(NamedTuple):
    pieces: list[Piece]
    socket_reads: int  # data the event loop handed to the worker's upstream connections
    elapsed_s: float


async def _answer(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tokens: list[str], pace: float | None
) -> _Answer:
    """The model's pieces for ``tokens`` streamed 5 ms apart, each written on its own."""
    upstream.script(Script(tokens=tokens, delay_s=0.005))
    count = [0]
    original = _Connection.data_received

    def counted(self: _Connection, data: bytes) -> None:
        if data:
            count[0] += 1
        original(self, data)

    monkeypatch.setattr(_Connection, "data_received", counted)
    model = OpenAIModel(EndpointConfig(kind="openai", base_url=upstream.base_url))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        paced = None if pace is None else (lambda: pace)
        pieces = [piece async for piece in model.stream(_job(), paced)]
    finally:
        await model.close()
    return _Answer(pieces, count[0], loop.time() - started)


async def test_a_paced_stream_is_read_in_few_reads_and_loses_nothing(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60 tokens 5 ms apart: 0.3 s of answer.
    tokens = numbered_tokens(60)
    pieces, received, elapsed = await _answer(upstream, monkeypatch, tokens, pace=0.1)

    text = [p for p in pieces if isinstance(p, str)]
    assert "".join(text) == "".join(tokens)
    finish = pieces[-1]
    assert isinstance(finish, Finish)
    assert finish.usage.completion_tokens == len(tokens)  # the upstream's usage event, read
    reads = pieces.count(BREATH)
    # Unpaced, every token is a read of its own (see the test below); paced at 0.1 s,
    # one read per 0.1 s of answer (0.3 s on an idle machine, longer on a busy one).
    assert 2 <= reads <= elapsed / 0.1 + 3, (reads, elapsed)
    # The first text is not held back for a pause: the first read is taken as soon as
    # it comes (a pause first would have gathered some 20 tokens).
    assert pieces[0] == tokens[0]
    assert pieces.index(BREATH) <= 5, pieces[:25]
    # The connection itself is paused between reads: the kernel holds what arrives,
    # and the event loop hands it over in one go, not a token at a time.
    assert received <= 4 * reads + 5, (received, reads)


async def test_an_unpaced_stream_is_read_as_it_comes(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = numbered_tokens(20)
    pieces, received, _ = await _answer(upstream, monkeypatch, tokens, pace=None)
    assert BREATH not in pieces
    assert received >= len(tokens)  # what the paced test's bound is measured against
    assert "".join(p for p in pieces if isinstance(p, str)) == "".join(tokens)


async def test_paced_reads_still_see_a_failure_mid_answer(upstream: FakeOpenAI) -> None:
    """The upstream goes away mid-answer, without [DONE] or a finish, while the reader waits."""
    upstream.script(Script(tokens=numbered_tokens(10), delay_s=0.005, hold_after=3))
    model = OpenAIModel(EndpointConfig(kind="openai", base_url=upstream.base_url))
    stream = model.stream(_job(), lambda: 0.05)
    assert isinstance(stream, AsyncGenerator)
    try:
        assert await anext(stream) == "tok0 "
        await upstream.close()
        with pytest.raises(UpstreamError):
            async for _ in stream:
                pass
    finally:
        await stream.aclose()
        await model.close()
