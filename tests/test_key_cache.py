"""The key cache under bursts: one lookup per key, never more Redis connections than allowed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.gateway.app import redis_client
from services.gateway.key_cache import KeyCache
from services.gateway.settings import GatewaySettings
from shared.errors import ApiKeyDisabled, InvalidApiKey
from shared.keys import generate
from shared.records import Bot, KeyRecord
from shared.registry import Registry
from tests.support.stack import REDIS_URL

pytestmark = pytest.mark.integration


class CountingRegistry(Registry):
    """The real registry, counting key lookups; ``hold`` keeps lookups waiting."""

    def __init__(self, redis: Redis, registry: Registry) -> None:
        super().__init__(redis, registry.names)
        self.lookups = 0
        self.looked_up = asyncio.Event()
        self.hold: asyncio.Event | None = None

    def release(self) -> None:
        """Let held lookups finish; later ones are not held."""
        if self.hold is not None:
            self.hold.set()
            self.hold = None

    async def lookup(self, key_hash: str) -> tuple[KeyRecord | None, Bot | None]:
        self.lookups += 1
        self.looked_up.set()
        hold = self.hold
        found = await super().lookup(key_hash)
        if hold is not None:
            await hold.wait()  # what was read is held back, as on a slow network
        return found


async def new_key(registry: Registry) -> tuple[str, KeyRecord]:
    """A key (and its record) of a new echo bot."""
    bot = await registry.create_bot(name="b", endpoint="echo", model="m")
    return await registry.create_key(bot.id, "k")


async def held_lookup(
    cache: KeyCache, counting: CountingRegistry, key: str, *, callers: int
) -> list[asyncio.Task[tuple[KeyRecord, Bot]]]:
    """``callers`` resolves of ``key`` whose lookup has started and is held back."""
    counting.hold = asyncio.Event()
    tasks = [asyncio.create_task(cache.resolve(key)) for _ in range(callers)]
    async with asyncio.timeout(5):
        await counting.looked_up.wait()
    return tasks


@pytest.fixture
async def counting(redis: Redis, registry: Registry) -> CountingRegistry:
    return CountingRegistry(redis, registry)


@pytest.fixture
async def cache(counting: CountingRegistry, redis: Redis) -> AsyncIterator[KeyCache]:
    cache = KeyCache(counting, timeout_s=5.0, ttl_s=60.0, max_entries=100)
    listener = asyncio.create_task(cache.listen(redis, counting.names.invalidate_channel))
    async with asyncio.timeout(5):
        await cache.wait_online()
    yield cache
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)


async def test_a_burst_of_new_callers_on_one_key_is_one_lookup(
    cache: KeyCache, counting: CountingRegistry
) -> None:
    key, record = await new_key(counting)

    found = await asyncio.gather(*(cache.resolve(key) for _ in range(300)))

    assert counting.lookups == 1
    assert {r.key_id for r, _ in found} == {record.key_id}
    await cache.resolve(key)
    assert counting.lookups == 1  # and then cached


async def test_a_caller_that_leaves_does_not_fail_the_others(
    cache: KeyCache, counting: CountingRegistry
) -> None:
    key, record = await new_key(counting)
    first, second = await held_lookup(cache, counting, key, callers=2)
    first.cancel()
    counting.release()

    found, _ = await second
    assert found.key_id == record.key_id
    assert counting.lookups == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_caller_after_an_invalidation_does_not_join_an_older_lookup(
    cache: KeyCache, counting: CountingRegistry
) -> None:
    key, record = await new_key(counting)
    (before,) = await held_lookup(cache, counting, key, callers=1)

    # Disabled while that lookup's (still enabled) answer is on its way.
    invalidated = cache.next_invalidation()
    await counting.set_disabled(record.key_id, True)
    async with asyncio.timeout(5):
        await invalidated.wait()
    counting.release()

    with pytest.raises(ApiKeyDisabled):
        await cache.resolve(key)
    assert counting.lookups == 2
    await before  # it started before the change: either answer is fair
    with pytest.raises(ApiKeyDisabled):  # but it was not cached
        await cache.resolve(key)


async def test_more_concurrent_redis_calls_than_connections_wait_instead_of_failing(
    namespace: str, redis: Redis
) -> None:
    settings = GatewaySettings(
        namespace=namespace, redis_url=REDIS_URL, redis_max_connections=4, redis_timeout_s=5.0
    )
    client = redis_client(settings)
    try:
        await client.set(f"{namespace}:x", b"1")
        found = await asyncio.gather(*(client.get(f"{namespace}:x") for _ in range(300)))
        assert found == [b"1"] * 300
        # Each CLIENT ID answers with the id of the connection it was sent on.
        used = await asyncio.gather(*(client.client_id() for _ in range(300)))
        assert len(set(used)) <= 4
    finally:
        await client.aclose()


async def test_invented_keys_cannot_push_real_keys_out(
    cache: KeyCache, counting: CountingRegistry
) -> None:
    key, record = await new_key(counting)
    await cache.resolve(key)
    invented = [generate() for _ in range(1000)]  # well-formed, unknown to Redis
    for fake in invented:
        with pytest.raises(InvalidApiKey):
            await cache.resolve(fake)
    assert counting.lookups == 1001
    # The real key (in a cache of 100 entries) is still there: no lookup.
    found, _ = await cache.resolve(key)
    assert found.key_id == record.key_id
    assert counting.lookups == 1001
    # Unknown keys are remembered too, for a short while, in their own cache.
    with pytest.raises(InvalidApiKey):
        await cache.resolve(invented[-1])
    assert counting.lookups == 1001
    assert cache.sizes == (1, 1000)


async def test_the_unknown_key_cache_is_bounded_and_short_lived(
    counting: CountingRegistry, redis: Redis
) -> None:
    cache = KeyCache(
        counting, timeout_s=5.0, ttl_s=60.0, max_entries=100, unknown_ttl_s=5.0, max_unknown=10
    )
    listener = asyncio.create_task(cache.listen(redis, counting.names.invalidate_channel))
    try:
        async with asyncio.timeout(5):
            await cache.wait_online()
        invented = [generate() for _ in range(25)]
        for fake in invented:
            with pytest.raises(InvalidApiKey):
                await cache.resolve(fake)
        assert cache.sizes == (0, 10)
        with pytest.raises(InvalidApiKey):
            await cache.resolve(invented[-1])  # among the 10 newest: cached
        assert counting.lookups == 25
        with pytest.raises(InvalidApiKey):
            await cache.resolve(invented[0])  # evicted: looked up again
        assert counting.lookups == 26
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
