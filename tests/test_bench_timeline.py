"""The bench's timeline of a lone answer (bench/timeline.py, bench/marks.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from bench import marks
from bench.targets import ROOT
from bench.timeline import ANSWER, CALL, _has_text, spreads, steps


def test_every_mark_names_a_function_that_exists() -> None:
    for mark in marks.MARKS:
        _, _, function = marks.resolve(mark)
        assert callable(function), mark


def test_a_mark_of_a_function_that_is_gone_is_refused() -> None:
    with pytest.raises(LookupError):
        marks.resolve(marks.Mark("x", "services.gateway.job_client", "JobClient.no_such"))


async def test_marks_fall_at_a_call_or_at_its_return_and_keep_what_it_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("marked_here")

    class Thing:
        def twice(self, x: int) -> int:
            marks.note("inside twice")
            return 2 * x

        async def later(self, x: int) -> int:
            marks.note("inside later")
            return x + 1

    module.Thing = Thing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "marked_here", module)
    monkeypatch.setattr(marks, "_noted", [])
    labels = marks.install(
        "test",
        (
            marks.Mark("twice", "marked_here", "Thing.twice"),
            marks.Mark("later", "marked_here", "Thing.later", at_exit=True),
        ),
    )
    assert labels == ["test: twice", "test: later"]
    assert Thing().twice(3) == 6
    assert await Thing().later(3) == 4
    order = [label for label, _ in marks._noted]
    assert order == ["test: twice", "inside twice", "inside later", "test: later"]
    times = [ns for _, ns in marks._noted]
    assert times == sorted(times)


def test_steps_pair_each_calls_marks_in_time_order_and_drop_rare_ones() -> None:
    # Two calls; the second has a stray mark in it (something else that ran meanwhile).
    timed = [(1_000_000, 1_100_000), (2_000_000, 2_120_000)]
    found = [
        (1_010_000, "gateway: in"),
        (1_060_000, "worker: job"),
        (2_012_000, "gateway: in"),
        (2_030_000, "heartbeat"),
        (2_070_000, "worker: job"),
        (1_500_000, "between calls"),
    ]
    by_pair = {(s.start, s.end): s for s in steps(found, timed)}
    assert by_pair[CALL, "gateway: in"].p50_us == pytest.approx(11.0)
    assert by_pair[CALL, "gateway: in"].calls == 2
    # Seen in one call of two: at the threshold, kept.
    assert by_pair["gateway: in", "worker: job"].p50_us == pytest.approx(50.0)
    assert by_pair["worker: job", ANSWER].p50_us == pytest.approx(45.0)
    assert all("between calls" not in pair for pair in by_pair)
    ordered = [s.start for s in steps(found, timed)]
    assert ordered.index(CALL) < ordered.index("gateway: in") < ordered.index("worker: job")
    # In three calls, a pair seen once is left out.
    three = [*timed, (3_000_000, 3_050_000)]
    assert ("gateway: in", "heartbeat") not in {(s.start, s.end) for s in steps(found, three)}


def test_a_bursts_marks_are_spread_from_its_start_to_its_last_first_token() -> None:
    # Two bursts (start, last first token), ns; a mark outside them is not counted.
    bursts = [(10_000_000, 20_000_000), (50_000_000, 58_000_000)]
    found = [
        *((10_000_000 + i * 1_000_000, "gateway: publish") for i in range(5)),  # 0-4 ms
        *((50_000_000 + i * 2_000_000, "gateway: publish") for i in range(4)),  # 0-6 ms
        (13_000_000, "worker: job in"),
        (55_000_000, "worker: job in"),
        (30_000_000, "gateway: publish"),  # between the bursts
        (12_000_000, "heartbeat"),  # in one burst of two: something else
    ]
    rows = {row.label: row for row in spreads(found, bursts)}
    assert set(rows) == {"gateway: publish", "worker: job in"}
    publish = rows["gateway: publish"]
    assert publish.count == pytest.approx(4.5)  # 5 and 4, the median
    assert publish.first_ms == pytest.approx(0.0)
    assert publish.p50_ms == pytest.approx(3.0)  # 2 ms and 4 ms
    assert publish.p90_ms == pytest.approx(5.0)  # 4 ms and 6 ms
    assert rows["worker: job in"].first_ms == pytest.approx(4.0)  # 3 ms and 5 ms
    assert [row.label for row in spreads(found, bursts)] == ["gateway: publish", "worker: job in"]


def _timeline(*args: str) -> str:
    """``python -m bench.timeline ARGS``'s table; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.timeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_first_token_is_a_chunk_with_text_not_a_role_alone() -> None:
    role_only = b' {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    assert not _has_text(role_only)
    assert _has_text(b' {"choices":[{"index":0,"delta":{"content":"tok0 "}}]}')
    assert not _has_text(b' {"choices":[],"usage":{"total_tokens":3}}')
    assert not _has_text(b" [DONE]")


@pytest.mark.integration
def test_a_burst_is_timed_in_both_processes_and_beside_the_direct_call() -> None:
    table = _timeline("--burst", "10", "--rounds", "1")
    labels = {re.split(r"\s{2,}", line)[0] for line in table.splitlines()}
    for label in ("gateway: publish", "worker: job in", "worker: upstream call"):
        assert label in labels, table
    assert re.search(r"first token, botline: p10 [0-9.]+, p50", table), table
    assert re.search(r"first token, direct: p10 [0-9.]+, p50", table), table


@pytest.mark.integration
def test_the_timeline_runs_botline_with_marks_in_both_processes() -> None:
    table = _timeline("--requests", "200")
    pairs = {tuple(re.split(r"\s{2,}", line)[:2]) for line in table.splitlines()}
    for step in (
        ("gateway: request in", "gateway: publish"),
        ("worker: upstream call", "worker: upstream bytes"),
        ("gateway: event in", "gateway: answer whole"),
    ):
        assert step in pairs, table
    assert "the fake upstream called directly by the same caller" in table
