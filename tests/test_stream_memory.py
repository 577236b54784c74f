"""An open stream's memory in the gateway: what it keeps while it waits for the model."""

from __future__ import annotations

import gc

import pytest

from shared.wire import DeltaEvent
from tests.support.client import auth, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "tell me a story"}]}


def _live_deltas() -> list[DeltaEvent]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, DeltaEvent)]


async def test_a_stream_waiting_for_the_model_holds_none_of_its_events(stack: Stack) -> None:
    # Each event a stream relayed was kept until the next came (by the relay loop, its
    # first-event variable and the run's generator): about 2 KiB per open stream.
    up = stack.upstream
    held = Script(tokens=["once ", "upon ", "a ", "time"], hold_after=2)
    up.script(held)
    _, key = await stack.bot_and_key(endpoint="fake", model="fake-model")
    async with stack.http.post(
        f"{stack.url}/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status == 200
        events = sse_events(resp)
        text = ""
        while text != "once upon ":
            event = await anext(events)
            assert isinstance(event, dict)
            text += (event.get("choices") or {}).get("delta", {}).get("content") or ""
        # The model holds the rest; the gateway (on this loop) waits for its next event.
        assert _live_deltas() == []
        held.release.set()
        rest = [e async for e in events]
    statuses = [e["status"] for e in rest if isinstance(e, dict)]
    assert statuses[-1] == "END"
