"""Connection settings: several broker URLs, Redis Sentinels, the job queue's type."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.sentinel import SentinelConnectionPool

from shared.redis_client import SentinelRedis, redis_client
from shared.settings import CommonSettings


def test_one_amqp_url_or_several_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().amqp_urls == ["amqp://guest:guest@127.0.0.1:5672/"]
    monkeypatch.setenv("BOTLINE_AMQP_URL", "amqp://a:1/, amqp://b:2/,")
    assert CommonSettings().amqp_urls == ["amqp://a:1/", "amqp://b:2/"]


def test_sentinels_are_a_comma_separated_host_port_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().sentinel_addresses == []
    monkeypatch.setenv("BOTLINE_REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26380")
    monkeypatch.setenv("BOTLINE_REDIS_SENTINEL_MASTER", "main")
    settings = CommonSettings()
    assert settings.sentinel_addresses == [("10.0.0.1", 26379), ("sentinel-b", 26380)]
    assert settings.redis_sentinel_master == "main"
    monkeypatch.setenv("BOTLINE_REDIS_SENTINELS", "no-port")
    with pytest.raises(ValidationError):
        CommonSettings()


def test_queue_type_is_classic_or_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().jobs_queue_type == "classic"
    monkeypatch.setenv("BOTLINE_JOBS_QUEUE_TYPE", "quorum")
    assert CommonSettings().jobs_queue_type == "quorum"
    monkeypatch.setenv("BOTLINE_JOBS_QUEUE_TYPE", "stream")
    with pytest.raises(ValidationError):
        CommonSettings()


async def test_sentinel_client_takes_database_and_password_from_the_url() -> None:
    settings = CommonSettings(
        redis_url="redis://:s3cret@ignored:1/4",
        redis_sentinels=["127.0.0.1:26379"],
    )
    client = redis_client(settings, timeout_s=0.5, max_connections=8)
    try:
        assert isinstance(client, SentinelRedis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "botline"
        assert pool.connection_kwargs["db"] == 4
        assert pool.connection_kwargs["password"] == "s3cret"
        assert "host" not in pool.connection_kwargs
        assert pool.max_connections == 8
    finally:
        await client.aclose()
