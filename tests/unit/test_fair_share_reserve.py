"""The fair share's reserve of slots: lowered jobs held in the gateway, let go as jobs end.

Integration: tests/test_fair_share.py. Here, the arithmetic and the hold's
ends (let go, timed out, revoked, caller gone) without a broker.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.gateway.chat_run import ChatRun
from services.gateway.fair_share import FairShare
from services.gateway.inflight import InFlight
from services.gateway.job_client import Drain, Inbox
from services.gateway.slots import Slots
from shared.clock import now_ms
from shared.errors import ApiKeyRevoked, DeadlineExceeded, Overloaded
from shared.names import Names
from shared.priority import message_priority
from shared.wire import ChatJob, EndEvent, Usage
from tests.support.samples import JOB


class Counts:
    """Stands in for InFlight: a key's requests in flight, and the active keys."""

    def __init__(self, by_key: dict[str, int]) -> None:
        self.by_key = by_key

    def count(self, key_hash: str) -> int:
        return self.by_key.get(key_hash, 0)

    @property
    def active_keys(self) -> int:
        return len(self.by_key)


def fair(capacity: int, reserve_share: float, by_key: dict[str, int]) -> FairShare:
    share = FairShare(
        cast(Any, None),
        Names("t"),
        cast(InFlight, Counts(by_key)),
        refresh_s=1.0,
        queue_slots=0,
        timeout_s=1.0,
        reserve_share=reserve_share,
    )
    share.capacity = capacity
    return share


class Client:
    """Stands in for the AMQP job client: records what was published."""

    def __init__(self) -> None:
        self.queues: dict[str, Inbox] = {}
        self.submitted: list[str] = []
        self.drain = Drain()

    def register(self, job_id: str) -> Inbox:
        self.queues[job_id] = Inbox()
        return self.queues[job_id]

    def forget(self, job_id: str) -> None:
        self.queues.pop(job_id, None)

    async def submit(self, job: ChatJob, priority: int | None = None) -> None:
        self.submitted.append(job.job_id)

    def cancel(self, job_id: str) -> None:
        pass

    @property
    def waiting(self) -> int:
        return len(self.queues)


def run(client: Client, slots: Slots, job_id: str, **kw: Any) -> ChatRun:
    job = JOB.model_copy(update={"job_id": job_id} | kw.pop("job", {}))
    options: dict[str, Any] = {"deadline_s": 5.0, "event_timeout_s": 5.0, "lowered": True} | kw
    return ChatRun(cast(Any, client), job, slots=slots, **options)


async def _held(slots: Slots, n: int) -> None:
    async with asyncio.timeout(5):
        while slots.held < n:  # noqa: ASYNC110 -- a counter, polled with a deadline
            await asyncio.sleep(0)


def test_the_reserve_is_a_share_of_the_capacity_rounded_down() -> None:
    assert fair(100, 0.05, {}).reserve == 5
    assert fair(19, 0.05, {}).reserve == 0  # small fleets keep none
    assert fair(20, 0.05, {}).reserve == 1
    assert fair(100, 0.29, {}).reserve == 29  # not 28: 100 x 0.29 is 28.999... in floats
    assert fair(100, 0.0, {}).reserve == 0
    assert fair(0, 0.05, {}).reserve == 0


def test_shares_are_parts_of_the_slots_outside_the_reserve() -> None:
    alone = fair(100, 0.05, {"hog": 96})
    assert alone.share() == 95
    assert alone.place("hog", "normal") == (message_priority("normal", True), True)
    assert alone.slots.limit == 95
    two = fair(100, 0.05, {"hog": 96, "calm": 1})
    assert two.share() == 47
    assert two.place("calm", "normal") == (message_priority("normal", False), False)


@pytest.mark.parametrize(("capacity", "reserve_share"), [(100, 0.0), (4, 0.05), (19, 0.05)])
def test_without_a_reserve_places_are_as_before_and_nothing_is_held(
    capacity: int, reserve_share: float
) -> None:
    for by_key in ({"hog": capacity + 1}, {"hog": capacity, "calm": 1}, {"hog": 1}):
        share = fair(capacity, reserve_share, by_key)
        # Before the reserve: capacity // active keys, over it one step lower.
        before = max(1, capacity // len(by_key))
        assert share.share() == before
        over = by_key["hog"] > before
        assert share.place("hog", "high") == (message_priority("high", over), over)
    slots = fair(capacity, reserve_share, {}).slots
    assert slots.limit is None
    for _ in range(capacity * 3):
        assert slots.take(True, 0) is None  # never held
    assert (slots.taken, slots.held) == (capacity * 3, 0)


async def test_a_held_job_is_let_go_when_a_job_ends_best_priority_first() -> None:
    slots = Slots()
    slots.set_limit(2)
    assert slots.take(False, 5) is None
    assert slots.take(True, 4) is None
    low = slots.take(True, 1)
    high = slots.take(True, 4)
    assert low is not None
    assert high is not None
    assert slots.take(False, 5) is None  # within its share: never held
    assert (slots.taken, slots.held) == (3, 2)
    slots.give()
    assert not high.done()  # 2 taken: still only the reserve free
    slots.give()
    assert high.done()
    assert not low.done()
    assert (slots.taken, slots.held) == (2, 1)
    assert slots.leave(high)  # it has a slot: it gives it back when its job ends
    slots.set_limit(3)  # the fleet grew
    assert low.done()
    assert (slots.taken, slots.held) == (3, 0)


async def test_a_held_job_that_leaves_is_never_let_go() -> None:
    slots = Slots()
    slots.set_limit(1)
    assert slots.take(True, 0) is None
    first, second = slots.take(True, 0), slots.take(True, 0)
    assert first is not None
    assert second is not None
    assert not slots.leave(first)
    assert slots.held == 1
    slots.give()
    assert second.done()
    assert first.cancelled()
    assert (slots.taken, slots.held) == (1, 0)


async def test_a_held_run_is_published_when_a_job_ends() -> None:
    client, slots = Client(), Slots()
    slots.set_limit(1)
    first = run(client, slots, "j1", lowered=False)
    second = run(client, slots, "j2")
    async with first:
        entering = asyncio.create_task(second.__aenter__())
        await _held(slots, 1)
        assert client.submitted == ["j1"]
        client.queues["j1"].put_nowait(
            EndEvent(job_id="j1", attempt=1, seq=0, text="a", usage=Usage())
        )
        await first.complete()
    await entering
    assert client.submitted == ["j1", "j2"]
    assert (slots.taken, slots.held) == (1, 0)
    await second.__aexit__(None, None, None)
    assert slots.taken == 0


def _full() -> tuple[Client, Slots]:
    """A client, and slots whose one slot outside the reserve is taken."""
    client, slots = Client(), Slots()
    slots.set_limit(1)
    slots.take(False, 0)
    return client, slots


async def test_a_held_caller_who_leaves_publishes_nothing() -> None:
    client, slots = _full()
    held = run(client, slots, "j2")
    entering = asyncio.create_task(held.__aenter__())
    await _held(slots, 1)
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    assert client.submitted == []
    assert client.queues == {}  # its events are no longer routed
    assert not held.abandoned  # never queued: nothing to close on the workers
    assert held.charge() == Usage()
    assert (slots.taken, slots.held) == (1, 0)
    slots.give()
    assert slots.taken == 0  # the slot it left was not handed to it


async def test_a_held_job_ends_with_the_errors_of_its_wait_in_the_queue() -> None:
    client, slots = _full()
    # Its whole deadline: 504.
    with pytest.raises(DeadlineExceeded):
        async with run(client, slots, "j2", deadline_s=0.05):
            pass
    # Its share of the deadline (QUEUE_WAIT_SHARE): 503 with a Retry-After.
    wait = {"wait_until_ms": now_ms() + 50}
    with pytest.raises(Overloaded) as refused:
        async with run(client, slots, "j3", job=wait):
            pass
    assert refused.value.retry_after is not None
    assert refused.value.retry_after >= 1
    assert client.submitted == []
    assert (slots.taken, slots.held) == (1, 0)


async def test_a_revoke_ends_a_held_job() -> None:
    client, slots = _full()
    held = run(client, slots, "j2")
    entering = asyncio.create_task(held.__aenter__())
    await _held(slots, 1)
    held.interrupt(ApiKeyRevoked("this API key was revoked"))
    with pytest.raises(ApiKeyRevoked):
        await entering
    assert client.submitted == []
    assert (slots.taken, slots.held) == (1, 0)
