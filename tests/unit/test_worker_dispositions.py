"""What a worker decides for a redelivered job: run it again, in the pool or as a suspect,
bury it, or drop it because its gateway closed it (services/worker/worker.py's docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.worker.settings import WorkerSettings
from services.worker.worker import Action, Disposition, Worker
from shared.amqp import ATTEMPT_HEADER
from shared.clock import now_ms
from tests.support.samples import JOB


@dataclass
class Message:
    """The parts of an incoming AMQP message the worker reads."""

    body: bytes
    redelivered: bool
    headers: dict[str, Any] = field(default_factory=dict)


def job_body() -> bytes:
    return JOB.model_copy(update={"deadline_ms": now_ms() + 60_000}).dump()


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    worker = Worker(WorkerSettings(namespace="unit", jobs_delivery_limit=3))
    yield worker
    await worker._redis.aclose()


async def decide(
    worker: Worker, *, attempt: int, redelivered: bool, suspect: bool, closed: bool = False
) -> Disposition:
    async def is_closed(job_id: str) -> bool:
        return closed

    worker._closed = is_closed  # type: ignore[method-assign]
    message = Message(job_body(), redelivered, {ATTEMPT_HEADER: attempt})
    decided = await worker._handle(message, suspect=suspect)  # type: ignore[arg-type]
    if decided.action is Action.RETRY:
        # The copy expires with the job; checked apart, since now_ms moves.
        assert decided.deadline_ms > now_ms()
        decided = dataclasses.replace(decided, deadline_ms=0)
    return decided


@pytest.mark.parametrize(
    ("attempt", "suspect", "expected"),
    [
        # First death: run again at once, in the pool.
        (1, False, Disposition(Action.RETRY, attempt=2, suspect=False)),
        # Second death: run again alone, as a suspect.
        (2, False, Disposition(Action.RETRY, attempt=3, suspect=True)),
        # Deaths as a suspect: again as a suspect until past the limit (3)...
        (3, True, Disposition(Action.RETRY, attempt=4, suspect=True)),
        # ...then buried.
        (4, True, Disposition(Action.BURY, reason="delivery_limit")),
    ],
)
async def test_a_death_is_blamed_only_on_a_suspect(
    worker: Worker, attempt: int, suspect: bool, expected: Disposition
) -> None:
    assert await decide(worker, attempt=attempt, redelivered=True, suspect=suspect) == expected


async def test_deaths_in_the_pool_never_bury(worker: Worker) -> None:
    decided = await decide(worker, attempt=9, redelivered=True, suspect=False)
    assert decided == Disposition(Action.RETRY, attempt=10, suspect=True)


@pytest.mark.parametrize(
    ("attempt", "redelivered", "suspect"), [(1, True, False), (2, False, False), (3, False, True)]
)
async def test_a_closed_job_is_not_run_again(
    worker: Worker, attempt: int, redelivered: bool, suspect: bool
) -> None:
    decided = await decide(
        worker, attempt=attempt, redelivered=redelivered, suspect=suspect, closed=True
    )
    assert decided == Disposition(Action.ACK, count="dropped", endpoint="echo")
