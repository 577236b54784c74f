"""`botline export` / `botline import`: bots and key records round-trip, never a key."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from shared.keys import hash_key
from shared.records import Limits
from shared.registry import Registry
from shared.settings import CommonSettings
from tests.support.client import chat
from tests.support.stack import Stack, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
async def source(redis: Redis) -> AsyncIterator[Registry]:
    """A second namespace to export from (the test's own is the import target)."""
    namespace = f"t{secrets.token_hex(5)}"
    yield Registry(redis, CommonSettings(namespace=namespace).names)
    async for key in redis.scan_iter(match=f"{namespace}:*", count=500):
        await redis.delete(key)


async def snapshot(redis: Redis, namespace: str) -> dict[str, Any]:
    """Every Redis key of a namespace and its value."""
    state: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{namespace}:*", count=500):
        name = raw.decode() if isinstance(raw, bytes) else raw
        kind_raw = await redis.type(name)
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else kind_raw
        if kind == "string":
            state[name] = await redis.get(name)
        elif kind == "set":
            state[name] = sorted(await redis.smembers(name))
        elif kind == "hash":
            state[name] = await redis.hgetall(name)
        else:
            state[name] = kind
    return state


async def test_export_then_import_restores_bots_and_working_keys(
    bare_stack: Stack, source: Registry, redis: Redis, tmp_path: Path
) -> None:
    bot = await source.create_bot(
        name="helper", endpoint="echo", model="m", system_prompt="Be brief.", temperature=0.2
    )
    other = await source.create_bot(name="other", endpoint="echo", model="m")
    key, record = await source.create_key(bot.id, "ci", limits=Limits(rpm=100))
    disabled_key, disabled = await source.create_key(other.id, "old")
    await source.set_disabled(disabled.key_id, True)
    await source.touch({record.key_id: 1_700_000_000_000})

    dump = tmp_path / "botline.jsonl"
    _, note = await run_cli(source.names.namespace, "export", "--output", str(dump))
    assert note.strip() == "exported 2 bots, 2 keys"
    text = dump.read_text()
    # Nothing that authenticates: neither key, nor its secret part.
    for secret in (key, disabled_key):
        assert secret not in text
        assert secret[-20:] not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert lines[0]["format"] == "botline-export"
    assert [line["type"] for line in lines[1:]] == ["bot", "bot", "key", "key"]
    exported = {line["record"]["key_id"]: line for line in lines[3:]}
    assert exported[record.key_id]["key_hash"] == hash_key(key)
    assert exported[record.key_id]["record"]["last_used_at"] == 1_700_000_000_000
    assert exported[disabled.key_id]["record"]["disabled"] is True

    target = bare_stack.registry
    namespace = bare_stack.namespace
    out, _ = await run_cli(namespace, "import", str(dump))
    assert out.strip() == f"imported 2 bots, 2 keys into {namespace}"
    after_one = await snapshot(redis, namespace)
    await run_cli(namespace, "import", str(dump))
    assert await snapshot(redis, namespace) == after_one  # idempotent

    assert await target.list_bots() == await source.list_bots()
    assert await target.list_keys(bot.id) == await source.list_keys(bot.id)
    assert await target.list_keys(other.id) == await source.list_keys(other.id)
    assert (await target.export_records()) == (await source.export_records())

    # The restored key answers on a gateway of the restored namespace; the disabled one does not.
    await bare_stack.add_worker()
    await bare_stack.add_gateway()
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    status, answer, _ = await chat(bare_stack.http, bare_stack.url, key, body)
    assert status == 200, answer
    status, answer, _ = await chat(bare_stack.http, bare_stack.url, disabled_key, body)
    assert (status, answer["error"]["code"]) == (401, "api_key_disabled")


async def test_import_refuses_what_is_not_an_export(namespace: str, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"type": "bot"}\n')
    _, err = await run_cli(namespace, "import", str(wrong), ok=False)
    assert "is not a botline export" in err
