"""Watching the fleet's shared endpoint state from tests."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from shared.endpoint_state import endpoint_states
from shared.names import Names


async def until_endpoint_state(
    redis: Redis, names: Names, endpoint: str, state: str, timeout_s: float = 3.0
) -> None:
    """Poll until ``endpoint`` is in ``state``: a cooldown or pause ending is time passing
    in Redis, which nobody announces, so there is nothing to await."""
    async with asyncio.timeout(timeout_s):
        while (await endpoint_states(redis, names, [endpoint]))[0].state != state:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
