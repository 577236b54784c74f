"""A worker's coalescing window widens with the streams it carries."""

from __future__ import annotations

from services.worker.settings import WorkerSettings
from services.worker.worker import stream_window


def test_window_is_the_base_until_the_event_budget_is_shared() -> None:
    settings = WorkerSettings(coalesce_ms=20, events_per_s=1000)
    assert stream_window(settings, 0) == 0.02
    # 100 streams sharing 1000 events a second: each may send one per 0.1 s.
    assert stream_window(settings, 100) == 0.1
