"""``shared.loop.settle_heap``: start-up objects frozen, the youngest generation
collected less often, and reference cycles still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from shared.loop import settle_heap
from shared.settings import CommonSettings


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if not was_enabled:
            gc.disable()


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _tracked(obj: object) -> bool:
    """Whether a collection of any generation would walk ``obj``."""
    return any(o is obj for o in gc.get_objects())


def test_start_up_objects_leave_every_collection(collector: None) -> None:
    before = [object(), {}]  # a container the collector tracks
    assert _tracked(before)
    settle_heap(5_000)
    assert gc.get_threshold()[0] == 5_000
    assert gc.get_freeze_count() > 0
    assert not _tracked(before)  # in the permanent generation
    after: list[object] = []
    assert _tracked(after)


def test_cycles_made_later_are_still_collected_unasked(collector: None) -> None:
    settle_heap(1_000)
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # only the collector can free a cycle
    # More than the threshold of new containers, kept alive: a collection runs by itself.
    kept: list[list[object]] = [[] for _ in range(3_000)]
    assert gone() is None
    assert len(kept) == 3_000


def test_zero_leaves_the_collector_as_python_sets_it(collector: None) -> None:
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    settle_heap(0)
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == frozen


def test_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().gc_threshold == 10_000
    monkeypatch.setenv("BOTLINE_GC_THRESHOLD", "0")
    assert CommonSettings().gc_threshold == 0
    monkeypatch.setenv("BOTLINE_GC_THRESHOLD", "-1")
    with pytest.raises(ValidationError, match="gc_threshold"):
        CommonSettings()
