"""Bots and keys in Redis: the `botline` command writes them, gateways read them.

Layout (names from :mod:`shared.names`): a bot is one JSON string; a key's
record is one JSON string stored under the SHA-256 of the key, so the key
itself is never at rest. Every change is announced on the invalidation
channel, which every gateway listens to and drops its cached entry on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from shared import keys
from shared.clock import now_ms
from shared.names import Names
from shared.priority import Priority
from shared.records import Bot, KeyRecord, Limits, new_id

# One round trip per cache miss: the key's record and its bot together.
_LOOKUP = """
local record = redis.call('GET', KEYS[1])
if not record then return nil end
local bot = redis.call('GET', ARGV[1] .. cjson.decode(record)['bot_id'])
if not bot then return {record} end
return {record, bot}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def invalidation_for_key(key_hash: str) -> str:
    """The invalidation message for one key."""
    return f"key:{key_hash}"


def invalidation_for_bot(bot_id: str) -> str:
    """The invalidation message for a bot (and so every key of it)."""
    return f"bot:{bot_id}"


class Registry:
    """Reads and writes bots and keys of one namespace."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._lookup = redis.register_script(_LOOKUP)

    # --- bots -----------------------------------------------------------
    async def create_bot(self, **fields: Any) -> Bot:
        """Create and store a bot; ``fields`` are :class:`Bot`'s, without id."""
        bot = Bot(id=new_id("bot"), created_at=now_ms(), **fields)
        await self.put_bot(bot)
        return bot

    async def put_bot(self, bot: Bot) -> None:
        """Store (create or replace) a bot and tell the gateways."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.names.bot(bot.id), bot.model_dump_json())
            pipe.sadd(self.names.bots, bot.id)
            pipe.publish(self.names.invalidate_channel, invalidation_for_bot(bot.id))
            await pipe.execute()

    async def update_bot(self, bot_id: str, **fields: Any) -> Bot | None:
        """Change a bot's settings (validated); None if there is no such bot."""
        bot = await self.get_bot(bot_id)
        if bot is None:
            return None
        current = bot.model_dump()
        # A different endpoint replaces the list; a list replaces the one (its
        # first). The same endpoint changes nothing: the admin page sends it
        # back with every save and must not drop the fallbacks.
        if "endpoints" not in fields and fields.get("endpoint", bot.endpoint) != bot.endpoint:
            current.pop("endpoints")
        elif "endpoints" in fields and "endpoint" not in fields:
            current.pop("endpoint")
        updated = Bot.model_validate(current | fields | {"id": bot.id})
        await self.put_bot(updated)
        return updated

    async def get_bot(self, bot_id: str) -> Bot | None:
        """A bot by id, or None."""
        raw = await self.redis.get(self.names.bot(bot_id))
        return None if raw is None else Bot.model_validate_json(raw)

    async def list_bots(self) -> list[Bot]:
        """All bots, oldest first."""
        ids = sorted(_text(i) for i in await self.redis.smembers(self.names.bots))
        if not ids:
            return []
        raws = await self.redis.mget([self.names.bot(i) for i in ids])
        bots = [Bot.model_validate_json(r) for r in raws if r is not None]
        return sorted(bots, key=lambda b: (b.created_at, b.id))

    async def delete_bot(self, bot_id: str) -> bool:
        """Delete a bot. Its keys stay and are answered 404 ``bot_not_found``."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.names.bot(bot_id))
            pipe.srem(self.names.bots, bot_id)
            pipe.publish(self.names.invalidate_channel, invalidation_for_bot(bot_id))
            deleted, _, _ = await pipe.execute()
        return bool(deleted)

    # --- keys -----------------------------------------------------------
    async def create_key(
        self,
        bot_id: str,
        name: str = "",
        expires_at: int | None = None,
        limits: Limits | None = None,
        priority: Priority | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key for a bot; returns the key (shown once) and its record."""
        key = keys.generate()
        key_hash = keys.hash_key(key)
        record = KeyRecord(
            key_id=new_id("key"),
            bot_id=bot_id,
            name=name,
            prefix=keys.display_prefix(key),
            created_at=now_ms(),
            expires_at=expires_at,
            limits=limits or Limits(),
            priority=priority,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.names.key(key_hash), record.model_dump_json())
            pipe.set(self.names.key_id(record.key_id), key_hash)
            pipe.sadd(self.names.bot_keys(bot_id), record.key_id)
            # A gateway may hold a negative cache entry for this hash.
            pipe.publish(self.names.invalidate_channel, invalidation_for_key(key_hash))
            await pipe.execute()
        return key, record

    async def _hash_of(self, key_id: str) -> str | None:
        raw = await self.redis.get(self.names.key_id(key_id))
        return None if raw is None else _text(raw)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """A key's record by key id, with its last use, or None."""
        key_hash = await self._hash_of(key_id)
        if key_hash is None:
            return None
        raw, used = await self._get_with_last_used(key_hash, key_id)
        if raw is None:
            return None
        return KeyRecord.model_validate_json(raw).model_copy(update={"last_used_at": used})

    async def _get_with_last_used(self, key_hash: str, key_id: str) -> tuple[Any, int | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.names.key(key_hash))
            pipe.hget(self.names.key_last_used, key_id)
            raw, used = await pipe.execute()
        return raw, None if used is None else int(used)

    async def list_keys(self, bot_id: str) -> list[KeyRecord]:
        """A bot's keys, oldest first."""
        key_ids = await self.redis.smembers(self.names.bot_keys(bot_id))
        records = []
        for key_id in key_ids:
            record = await self.get_key(_text(key_id))
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def set_disabled(self, key_id: str, disabled: bool) -> KeyRecord | None:
        """Disable or enable a key; None if there is no such key."""
        return await self.update_key(key_id, disabled=disabled)

    async def update_key(self, key_id: str, **update: Any) -> KeyRecord | None:
        """Change a key's name, expiry, disabled flag or limits; None if no such key."""
        key_hash = await self._hash_of(key_id)
        if key_hash is None:
            return None
        raw = await self.redis.get(self.names.key(key_hash))
        if raw is None:
            return None
        current = KeyRecord.model_validate_json(raw)
        record = KeyRecord.model_validate(current.model_dump() | update | {"key_id": key_id})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.names.key(key_hash), record.model_dump_json())
            pipe.publish(self.names.invalidate_channel, invalidation_for_key(key_hash))
            await pipe.execute()
        return record

    async def revoke(self, key_id: str) -> bool:
        """Delete a key for good; False if there was no such key."""
        key_hash = await self._hash_of(key_id)
        if key_hash is None:
            return False
        raw = await self.redis.get(self.names.key(key_hash))
        bot_id = KeyRecord.model_validate_json(raw).bot_id if raw is not None else None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.names.key(key_hash), self.names.key_id(key_id))
            pipe.hdel(self.names.key_last_used, key_id)
            if bot_id is not None:
                pipe.srem(self.names.bot_keys(bot_id), key_id)
            pipe.publish(self.names.invalidate_channel, invalidation_for_key(key_hash))
            await pipe.execute()
        return True

    # --- the gateway's hot path ------------------------------------------
    async def lookup(self, key_hash: str) -> tuple[KeyRecord | None, Bot | None]:
        """A key's record and its bot, in one round trip."""
        found = await self._lookup(keys=[self.names.key(key_hash)], args=[self.names.bot_prefix])
        if not found:
            return None, None
        record = KeyRecord.model_validate_json(found[0])
        bot = Bot.model_validate_json(found[1]) if len(found) > 1 else None
        return record, bot

    async def add_usage(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Add to usage hashes (Redis key -> field -> increment), in one round trip."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, fields in counts.items():
                for field, amount in fields.items():
                    pipe.hincrby(name, field, amount)
            await pipe.execute()

    async def usage(self, names: list[str]) -> list[dict[str, int]]:
        """Usage counters of several keys or bots (``Names.key_usage``/``bot_usage``)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            found = await pipe.execute()
        return [{_text(k): int(v) for k, v in hash_.items()} for hash_ in found]

    async def touch(self, last_used: Mapping[str, int]) -> None:
        """Record keys' last use (key id -> epoch ms), batched by the gateway."""
        if last_used:
            mapping: dict[str | bytes, int] = {k: v for k, v in last_used.items()}
            await self.redis.hset(self.names.key_last_used, mapping=mapping)  # type: ignore[arg-type]

    # --- backup and restore ------------------------------------------------
    async def export_records(self) -> list[dict[str, Any]]:
        """Every bot and key record of the namespace, as JSON-able dicts, oldest first.

        Nothing here authenticates: Redis holds keys only as their SHA-256,
        which a gateway compares with the hash of the key a caller presents.
        Usage counters are not included.
        """
        records: list[dict[str, Any]] = [
            {"type": "bot", "bot": bot.model_dump()} for bot in await self.list_bots()
        ]
        keys_found = []
        async for name in self.redis.scan_iter(match=self.names.key_id("*"), count=500):
            key_id = _text(name).rsplit(":", 1)[1]
            key_hash = await self._hash_of(key_id)
            if key_hash is None:
                continue
            raw, used = await self._get_with_last_used(key_hash, key_id)
            if raw is None:
                continue
            record = KeyRecord.model_validate_json(raw).model_copy(update={"last_used_at": used})
            keys_found.append((record, key_hash))
        keys_found.sort(key=lambda found: (found[0].created_at, found[0].key_id))
        records += [
            {"type": "key", "key_hash": key_hash, "record": record.model_dump()}
            for record, key_hash in keys_found
        ]
        return records

    async def import_records(self, records: list[dict[str, Any]]) -> tuple[int, int]:
        """Store exported bots and key records (replacing any of the same id).

        Idempotent: importing the same records again leaves the same state.
        A key id already stored under another hash loses that hash, so that
        no key the export does not hold stays valid under that id. Returns
        the number of bots and keys stored.
        """
        bots = [Bot.model_validate(r["bot"]) for r in records if r.get("type") == "bot"]
        key_entries = [
            (KeyRecord.model_validate(r["record"]), keys.check_hash(r["key_hash"]))
            for r in records
            if r.get("type") == "key"
        ]
        for bot in bots:
            await self.put_bot(bot)
        for record, key_hash in key_entries:
            previous = await self._hash_of(record.key_id)
            stored = record.model_copy(update={"last_used_at": None})
            async with self.redis.pipeline(transaction=True) as pipe:
                if previous is not None and previous != key_hash:
                    pipe.delete(self.names.key(previous))
                    pipe.publish(self.names.invalidate_channel, invalidation_for_key(previous))
                pipe.set(self.names.key(key_hash), stored.model_dump_json())
                pipe.set(self.names.key_id(record.key_id), key_hash)
                pipe.sadd(self.names.bot_keys(record.bot_id), record.key_id)
                if record.last_used_at is not None:
                    pipe.hset(self.names.key_last_used, record.key_id, record.last_used_at)
                pipe.publish(self.names.invalidate_channel, invalidation_for_key(key_hash))
                await pipe.execute()
        return len(bots), len(key_entries)
