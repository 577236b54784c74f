"""The ``botline`` command manages bots and keys as SPEC §4 says."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from shared.keys import hash_key, is_well_formed
from shared.registry import Registry
from shared.settings import CommonSettings
from tests.support.stack import run_cli

pytestmark = pytest.mark.integration


async def botline(namespace: str, *args: str, ok: bool = True) -> tuple[str, str]:
    return await run_cli(namespace, *args, ok=ok)


async def test_bots_and_keys_lifecycle(namespace: str, registry: Registry, redis: Redis) -> None:
    out, _ = await botline(
        namespace, "bots", "create", "--name", "helper", "--system-prompt", "Be brief.",
        "--temperature", "0.2", "--max-history-messages", "4",
    )  # fmt: skip
    bot = orjson.loads(out)
    assert bot["name"] == "helper"
    assert bot["endpoint"] == "echo"
    assert (bot["temperature"], bot["top_p"], bot["max_reply_tokens"]) == (0.2, 0.7, 2048)
    assert bot["max_history_messages"] == 4
    bot_id = bot["id"]

    out, _ = await botline(namespace, "bots", "list")
    assert bot_id in out
    out, _ = await botline(namespace, "bots", "show", bot_id)
    assert orjson.loads(out)["system_prompt"] == "Be brief."

    key_out, note = await botline(namespace, "keys", "create", "--bot", bot_id, "--name", "ci",
                                  "--expires", "30d")  # fmt: skip
    key = key_out.strip()
    assert is_well_formed(key)
    assert "shown once" in note
    # Only the hash is at rest: the key itself is nowhere in Redis.
    for name in [
        k
        async for k in redis.scan_iter(
            match=CommonSettings(namespace=namespace).names.all_redis_keys
        )
    ]:
        value = await redis.get(name) if await redis.type(name) == b"string" else b""
        assert key.encode() not in (value or b"")
    record, _ = await registry.lookup(hash_key(key))
    assert record is not None
    assert record.name == "ci"
    assert record.expires_at is not None
    assert record.prefix == key[:9]

    out, _ = await botline(namespace, "keys", "list", "--bot", bot_id)
    assert record.key_id in out
    assert "active" in out
    assert key not in out
    await botline(namespace, "keys", "disable", record.key_id)
    assert "disabled" in (await botline(namespace, "keys", "list", "--bot", bot_id))[0]
    await botline(namespace, "keys", "enable", record.key_id)
    assert "active" in (await botline(namespace, "keys", "list", "--bot", bot_id))[0]
    await botline(namespace, "keys", "revoke", record.key_id)
    assert (await registry.lookup(hash_key(key))) == (None, None)
    _, err = await botline(namespace, "keys", "revoke", record.key_id, ok=False)
    assert "no key" in err

    await botline(namespace, "bots", "delete", bot_id)
    _, err = await botline(namespace, "bots", "show", bot_id, ok=False)
    assert "no bot" in err


async def test_bad_input_is_a_clear_error(namespace: str, registry: Registry) -> None:
    _, err = await botline(namespace, "keys", "create", "--bot", "bot_missing", ok=False)
    assert "no bot" in err
    out, _ = await botline(namespace, "bots", "create", "--name", "x")
    bot_id = orjson.loads(out)["id"]
    _, err = await botline(namespace, "keys", "create", "--bot", bot_id, "--expires", "soon",
                           ok=False)  # fmt: skip
    assert "--expires" in err
    _, err = await botline(namespace, "bots", "create", "--name", "y", "--temperature", "9",
                           ok=False)  # fmt: skip
    assert "temperature" in err
    assert "Traceback" not in err
