"""A worker's coalescing window widens with the streams it carries."""

from __future__ import annotations

import asyncio

from services.worker.settings import WorkerSettings
from services.worker.worker import Worker


async def test_window_is_the_base_until_the_event_budget_is_shared() -> None:
    worker = Worker(WorkerSettings(coalesce_ms=20, events_per_s=1000))
    assert worker._stream_window() == 0.02
    idle: list[asyncio.Task[object]] = [
        asyncio.create_task(asyncio.Event().wait()) for _ in range(100)
    ]
    worker._running.update({f"job{i}": task for i, task in enumerate(idle)})
    # 100 streams sharing 1000 events a second: each may send one per 0.1 s.
    assert worker._stream_window() == 0.1
    for task in idle:
        task.cancel()
    await asyncio.gather(*idle, return_exceptions=True)
