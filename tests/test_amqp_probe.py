"""The AMQP probe (bench/amqp_probe.py): both clients deliver every message they publish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from bench.amqp_probe import Figures, _aiormq_frames, _aiormq_plain, _frames
from shared.settings import CommonSettings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "client",
    [_aiormq_plain, _aiormq_frames, _frames],
    ids=["aiormq", "aiormq+botline", "frames"],
)
async def test_each_client_gets_back_every_message(
    client: Callable[[str, int, int, bytes], Awaitable[Figures]],
) -> None:
    url = CommonSettings().amqp_urls[0]
    # A figure is returned only once all 500 came back (a lost one times out here).
    async with asyncio.timeout(30):
        per_message = await client(url, 500, 64, b'{"text":"tok tok"}')
    assert per_message.cpu > 0
    # The wall clock covers the CPU: one process, nothing else running in it.
    assert per_message.wall >= per_message.cpu
