"""Liveness and readiness probes, and the metrics endpoint Prometheus scrapes."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from services.gateway.resources import Gateway, gateway_of


async def check_backends(gateway: Gateway) -> dict[str, bool]:
    """Whether Redis, RabbitMQ and the key invalidations answer; sets ``botline_backend_up``."""
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
    for backend, up in checks.items():
        gateway.metrics.backend_up.labels(backend).set(1 if up else 0)
    return checks


async def livez(request: web.Request) -> web.Response:
    """The process runs and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 while Redis or RabbitMQ is unreachable, or the key cache cannot be trusted."""
    checks = await check_backends(gateway_of(request))
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus' text format; the backends are checked first."""
    gateway = gateway_of(request)
    await check_backends(gateway)
    return web.Response(
        body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
