"""The one way botline builds a Redis client: direct, or through Redis Sentinel.

With ``BOTLINE_REDIS_SENTINELS`` set, the master's address is asked of the
Sentinels (``redis.asyncio.sentinel``) on every new connection, so after a
failover the next command reaches the promoted master without a restart;
``BOTLINE_REDIS_URL`` then only gives the database and credentials. Either
way the client fails fast: a dead or frozen server costs one timeout, never
redis-py's default minute (FIELD-NOTES trap 3).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from shared.settings import CommonSettings


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection instead of failing."""


class SentinelRedis(Redis):
    """A client of the Sentinels' current master; closing it closes the Sentinel clients too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master's pool, then the connections to the Sentinels."""
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def redis_client(
    settings: CommonSettings,
    *,
    timeout_s: float,
    max_connections: int = 64,
    health_check_interval: int = 10,
) -> Redis:
    """A Redis client that fails fast instead of waiting a minute on a dead server.

    Its pool blocks rather than fails when every connection is busy: redis-py's
    default pool raises ``Too many connections`` past 100, which turned a burst
    of 100 new callers into 503s. Waiting for a connection counts against the
    same timeout as the call itself.
    """
    common: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": health_check_interval,
    }
    url = settings.redis_url.get_secret_value()
    if not settings.redis_sentinels:
        return Redis.from_pool(BlockingConnectionPool.from_url(url, **common))
    # Database, credentials and TLS from the URL; the address from the Sentinels.
    from_url: dict[str, Any] = {
        k: v for k, v in parse_url(url).items() if k not in ("host", "port", "path")
    }
    if from_url.pop("connection_class", None) is not None:
        from_url["ssl"] = True  # rediss://: the Sentinel pool picks its TLS connection class
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
    )
    client = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=SentinelRedis,
        connection_pool_class=_BlockingSentinelPool,
        **from_url,
        **common,
    )
    assert isinstance(client, SentinelRedis)
    client.sentinels = sentinel
    return client
