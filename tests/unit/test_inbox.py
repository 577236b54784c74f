"""The gateway's per-job event inbox (services/gateway/job_client.py)."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.job_client import STARTED, Inbox, Incoming
from shared.wire import DeltaEvent


def _delta(seq: int) -> DeltaEvent:
    return DeltaEvent(job_id="j", attempt=1, seq=seq, text=f"d{seq}")


def _seq(event: Incoming) -> int:
    assert isinstance(event, DeltaEvent)
    return event.seq


async def test_events_come_out_in_order_and_wake_a_waiting_reader() -> None:
    inbox = Inbox()
    inbox.put_nowait(STARTED)
    assert await inbox.get() is STARTED
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()
    inbox.put_nowait(_delta(1))
    inbox.put_nowait(_delta(2))
    assert _seq(await reader) == 1
    assert _seq(await inbox.get()) == 2
    assert inbox.empty()


async def test_a_cancelled_read_loses_nothing_and_the_next_reader_may_start_at_once() -> None:
    inbox = Inbox()
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    first.cancel()  # not yet run: its waiter is cancelled, its clean-up still to come
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(_delta(1))
    assert _seq(await second) == 1
    assert first.cancelled()
    # An event put while a cancelled read is on its way out stays for the next read.
    third = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(_delta(2))
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert _seq(await inbox.get()) == 2


async def test_a_read_with_a_timeout_raises_timeout_error_once_it_has_waited_that_long() -> None:
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await inbox.get(0.05)
    assert 0.04 <= loop.time() - started < 1.0
    # Nothing there and no time: at once, as asyncio.timeout(0) around a wait.
    with pytest.raises(TimeoutError):
        await inbox.get(0)
    # An event already there is returned whatever the timeout.
    inbox.put_nowait(_delta(1))
    assert _seq(await inbox.get(0)) == 1


async def test_an_event_in_time_is_returned_and_one_after_the_timeout_waits_for_the_next_read() -> (
    None
):
    inbox = Inbox()
    reader = asyncio.ensure_future(inbox.get(5.0))
    await asyncio.sleep(0)  # the reader waits
    assert not reader.done()
    inbox.put_nowait(_delta(1))
    assert _seq(await reader) == 1
    with pytest.raises(TimeoutError):
        await inbox.get(0.02)
    inbox.put_nowait(_delta(2))
    assert _seq(await inbox.get(1.0)) == 2
    assert inbox.empty()


async def test_a_read_with_a_timeout_is_cancelled_as_a_read_without_one() -> None:
    inbox = Inbox()
    reader = asyncio.ensure_future(inbox.get(0.05))
    await asyncio.sleep(0)  # the reader waits
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert reader.cancelled()  # a CancelledError, not a TimeoutError
    await asyncio.sleep(0.08)  # past its timer: whatever it would do, the next read is undisturbed
    inbox.put_nowait(_delta(1))
    assert _seq(await inbox.get(1.0)) == 1
