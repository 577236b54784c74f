"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from services.gateway.resources import GATEWAY


async def livez(request: web.Request) -> web.Response:
    """The process runs and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 while Redis or RabbitMQ is unreachable, or the key cache cannot be trusted."""
    gateway = request.config_dict[GATEWAY]
    redis_ok = True
    try:
        async with asyncio.timeout(gateway.settings.redis_timeout_s):
            await gateway.redis.ping()
    except (RedisError, OSError, TimeoutError):
        redis_ok = False
    checks = {
        "redis": redis_ok,
        "amqp": gateway.job_client.ready,
        "key_invalidations": gateway.keys.online,
    }
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )
