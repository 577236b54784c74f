"""The gateway's per-job event inbox (services/gateway/job_client.py)."""

from __future__ import annotations

import asyncio

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
