"""The gateway's fencing of events: one attempt, no gaps, retries unseen when possible."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.chat_run import ChatRun
from services.gateway.job_client import DEAD, Inbox, Incoming
from shared.errors import ApiKeyRevoked, DeadlineExceeded, JobFailed, UpstreamError, WorkerLost
from shared.wire import ChatJob, DeltaEvent, EndEvent, ErrorEvent, Usage
from tests.support.samples import JOB

USAGE = Usage(prompt_tokens=2, completion_tokens=3)


class ScriptedJobClient:
    """Stands in for the AMQP job client: hands the run a scripted sequence of events."""

    def __init__(self, events: list[Incoming]) -> None:
        self.events = events
        self.cancelled: list[str] = []
        self.submitted: list[ChatJob] = []

    def register(self, job_id: str) -> Inbox:
        queue = Inbox()
        for event in self.events:
            queue.put_nowait(event)
        return queue

    def forget(self, job_id: str) -> None:
        pass

    async def submit(self, job: ChatJob, priority: int | None = None) -> None:
        self.submitted.append(job)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def delta(attempt: int, seq: int, text: str) -> DeltaEvent:
    return DeltaEvent(job_id="j1", attempt=attempt, seq=seq, text=text)


def end(attempt: int, seq: int, text: str = "") -> EndEvent:
    return EndEvent(job_id="j1", attempt=attempt, seq=seq, text=text, usage=USAGE)


def run_with(events: list[Incoming], **kw: Any) -> tuple[ChatRun, ScriptedJobClient]:
    client = ScriptedJobClient(events)
    options = {"deadline_s": 5.0, "event_timeout_s": 5.0} | kw
    return ChatRun(client, JOB, **options), client  # type: ignore[arg-type]


async def test_whole_answer_joins_the_pieces() -> None:
    run, client = run_with([delta(1, 0, "a"), delta(1, 1, "b"), end(1, 2, "c")])
    async with run:
        answer = await run.complete()
    assert (answer.text, answer.usage) == ("abc", USAGE)
    assert client.cancelled == []


async def test_a_retry_restarts_a_whole_answer_unseen() -> None:
    run, _ = run_with([delta(1, 0, "lost "), delta(2, 0, "a"), delta(1, 1, "late"), end(2, 1, "b")])
    async with run:
        assert (await run.complete()).text == "ab"


async def test_a_retry_after_streamed_text_is_worker_lost() -> None:
    run, client = run_with([delta(1, 0, "a"), delta(2, 0, "a")])
    seen: list[DeltaEvent | EndEvent] = []

    async def relay_all() -> None:
        async with run:
            async for event in run.stream():
                seen.append(event)

    with pytest.raises(WorkerLost):
        await relay_all()
    assert [e.text for e in seen] == ["a"]
    assert client.cancelled == ["j1"]


async def test_a_retry_before_anything_was_streamed_is_unseen() -> None:
    run, _ = run_with([delta(2, 0, "x"), end(2, 1)])
    async with run:
        assert [e.text async for e in run.stream()] == ["x", ""]


async def test_a_gap_in_seq_is_an_error() -> None:
    run, _ = run_with([delta(1, 0, "a"), delta(1, 2, "c")])
    with pytest.raises(WorkerLost):
        async with run:
            await run.complete()


async def test_error_events_become_their_errors() -> None:
    error = ErrorEvent(job_id="j1", attempt=1, seq=0, code="upstream_error", message="bad")
    run, client = run_with([error])
    with pytest.raises(UpstreamError):
        async with run:
            await run.complete()
    assert client.cancelled == []  # the job ended: nothing to cancel


async def test_dead_jobs_fail() -> None:
    run, _ = run_with([DEAD])
    with pytest.raises(JobFailed):
        async with run:
            await run.complete()


async def test_silence_after_the_first_event_times_out() -> None:
    run, client = run_with([delta(1, 0, "a")], event_timeout_s=0.05)
    with pytest.raises(DeadlineExceeded, match="sent nothing"):
        async with run:
            await run.complete()
    assert client.cancelled == ["j1"]


async def test_no_event_before_the_deadline_times_out() -> None:
    run, _ = run_with([], deadline_s=0.05)
    with pytest.raises(DeadlineExceeded, match="no answer"):
        async with run:
            await run.complete()


async def test_an_answer_cut_short_is_charged_what_was_sent() -> None:
    # JOB's prompt is one word: 1 + 4 per message + 2.
    error = ErrorEvent(job_id="j1", attempt=2, seq=2, code="upstream_error", message="bad")
    run, _ = run_with([delta(1, 0, "lost"), delta(2, 0, "two words"), delta(2, 1, ", x"), error])
    with pytest.raises(UpstreamError):
        async with run:
            await run.complete()
    assert run.charge() == Usage(prompt_tokens=7, completion_tokens=4)


async def test_a_whole_answer_is_charged_its_own_usage_and_nothing_sent_costs_nothing() -> None:
    run, _ = run_with([delta(1, 0, "a"), end(1, 1, "b")])
    async with run:
        await run.complete()
    assert run.charge() == USAGE
    quiet, _ = run_with([], deadline_s=0.05)
    with pytest.raises(DeadlineExceeded):
        async with quiet:
            await quiet.complete()
    assert quiet.charge() == Usage()


async def test_an_interrupted_run_raises_its_error_and_cancels_the_job() -> None:
    run, client = run_with([delta(1, 0, "a")])
    seen: list[str] = []

    async def relay_all() -> None:
        async with run:
            async for event in run.stream():
                seen.append(event.text)
                run.interrupt(ApiKeyRevoked("revoked"))

    with pytest.raises(ApiKeyRevoked):
        await relay_all()
    assert seen == ["a"]
    assert client.cancelled == ["j1"]
    # Interrupted before it started: it ends at once.
    early, _ = run_with([])
    early.interrupt(ApiKeyRevoked("revoked"))
    with pytest.raises(ApiKeyRevoked):
        async with early:
            await early.complete()
