"""Revoke, disable and expiry reach requests already running, on every gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from shared.clock import now_ms
from tests.support.client import OPENAI_CHAT, SEED_CHAT, auth, sse_events
from tests.support.fake_openai import Script
from tests.support.stack import ProcessFactory, Stack, free_port

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "hold on"}]}
# Every request in flight must have ended this soon after the change.
WITHIN_S = 1.0


async def open_stream(
    http: aiohttp.ClientSession, url: str, key: str, path: str
) -> tuple[aiohttp.ClientResponse, Any]:
    body = ASK | {"stream": True} | ({"model": "m"} if path == OPENAI_CHAT else {})
    resp = await http.post(f"{url}{path}", json=body, headers=auth(key))
    assert resp.status == 200, await resp.text()
    events = sse_events(resp)
    first = await anext(events)
    assert isinstance(first, dict)
    assert first.get("status", "START") == "START"
    return resp, events


async def rest_of(events: Any) -> list[Any]:
    return [event async for event in events]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("revoke", "api_key_revoked"),
        ("disable", "api_key_disabled"),
        ("expire", "api_key_expired"),
    ],
)
async def test_a_keys_open_requests_end_on_every_gateway(
    bare_stack: Stack, processes: ProcessFactory, change: str, code: str
) -> None:
    up = bare_stack.upstream
    holds = [Script(tokens=["a ", "b"], hold_after=1) for _ in range(4)]
    for script in holds:
        up.script(script)  # every answer stalls after its first word
    await bare_stack.add_worker()
    urls = []
    for _ in range(2):
        port = free_port()
        await processes("gateway", "--port", str(port))
        urls.append(f"http://127.0.0.1:{port}")
    bot = await bare_stack.registry.create_bot(name="r", endpoint="fake", model="m")
    expires_at = now_ms() + 4000 if change == "expire" else None
    key, record = await bare_stack.registry.create_key(bot.id, "k", expires_at=expires_at)
    http = bare_stack.http
    wholes: list[asyncio.Task[aiohttp.ClientResponse]] = []
    try:
        seed, seed_events = await open_stream(http, urls[0], key, SEED_CHAT)
        openai, openai_events = await open_stream(http, urls[1], key, OPENAI_CHAT)
        for url, path in ((urls[1], SEED_CHAT), (urls[0], OPENAI_CHAT)):
            body = ASK | {"model": "m"}
            wholes.append(
                asyncio.create_task(http.post(f"{url}{path}", json=body, headers=auth(key)))
            )
        await up.wait_request(4)  # all four are with the model
        if change == "revoke":
            assert await bare_stack.registry.revoke(record.key_id)
        elif change == "disable":
            assert await bare_stack.registry.set_disabled(record.key_id, True)
        else:
            assert expires_at is not None
            assert now_ms() < expires_at, "the requests took too long to start"
            await asyncio.sleep((expires_at - now_ms()) / 1000)  # until the key expires

        async with asyncio.timeout(WITHIN_S):
            seed_rest, openai_rest, *answers = await asyncio.gather(
                rest_of(seed_events), rest_of(openai_events), *wholes
            )
        # Streams: exactly one terminal error event, then the end of the stream.
        assert len(seed_rest) == 1, seed_rest
        assert seed_rest[0]["status"] == "ERROR"
        assert seed_rest[0]["error"]["code"] == code
        assert openai_rest == [
            {"error": {"message": openai_rest[0]["error"]["message"], "type":
                       "authentication_error", "param": None, "code": code}}
        ]  # fmt: skip
        # Whole answers: the matching 401.
        for answer in answers:
            assert answer.status == 401
            assert (await answer.json())["error"]["code"] == code
            answer.release()
        seed.close()
        openai.close()
        # The worker stopped each upstream call (the cancel path).
        async with asyncio.timeout(2.0):
            for n in range(1, 5):
                await (await up.wait_request(n)).disconnected.wait()
        assert not any(r.finished.is_set() for r in up.requests)
    finally:
        for script in holds:
            script.release.set()
        for task in wholes:
            task.cancel()
        await asyncio.gather(*wholes, return_exceptions=True)
