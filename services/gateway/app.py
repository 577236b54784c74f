"""``create_app(settings)``: the gateway as an aiohttp application.

Redis and RabbitMQ connections and the background tasks live in a
``cleanup_ctx`` generator, so they are opened on startup and closed on
shutdown in order.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from redis.asyncio import Redis

from services.gateway.auth_failures import AuthFailures
from services.gateway.closed_jobs import ClosedJobs
from services.gateway.fair_share import FairShare
from services.gateway.http_server import GatewayRunner
from services.gateway.inflight import InFlight
from services.gateway.job_client import JobClient
from services.gateway.key_cache import KeyCache
from services.gateway.limits import Limiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import edge, stamp_headers
from services.gateway.resources import GATEWAY, Gateway
from services.gateway.routes import setup_routes
from services.gateway.security_headers import security_headers
from services.gateway.settings import GatewaySettings
from services.gateway.usage import UsageBook
from shared.loop import new_event_loop, settle_heap, watch_lag
from shared.redis_client import redis_client as shared_redis_client
from shared.registry import Registry
from shared.tasks import stop

log = structlog.get_logger("botline.gateway")


def redis_client(settings: GatewaySettings) -> Redis:
    """The gateway's Redis client (direct or through Sentinel; see shared/redis_client.py)."""
    return shared_redis_client(
        settings,
        timeout_s=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
    )


async def _resources(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    settings = gateway.settings
    tasks = [
        asyncio.create_task(gateway.keys.listen(gateway.redis, settings.names.invalidate_channel)),
        asyncio.create_task(gateway.usage.run(settings.usage_flush_s)),
        asyncio.create_task(gateway.limiter.renew_leases()),
        asyncio.create_task(watch_lag(gateway.metrics.loop_lag.set)),
        asyncio.create_task(gateway.fair_share.run()),
    ]
    try:
        await gateway.job_client.start()
        log.info("gateway.started", gateway_id=gateway.job_client.gateway_id)
        yield
    finally:
        await stop(tasks)
        await gateway.inflight.close()
        await gateway.limiter.close()
        await gateway.usage.flush()
        await gateway.closed_jobs.aclose()
        await gateway.job_client.close()
        await gateway.redis.aclose()


def create_app(settings: GatewaySettings) -> web.Application:
    """The gateway application; connections open when it starts."""
    app = web.Application(middlewares=[edge], client_max_size=settings.max_body_bytes)
    redis = redis_client(settings)
    registry = Registry(redis, settings.names)
    metrics = GatewayMetrics(bot_labels=settings.metrics_bot_labels)
    keys = KeyCache(
        registry,
        timeout_s=settings.redis_timeout_s,
        ttl_s=settings.key_cache_ttl_s,
        max_entries=settings.key_cache_size,
        unknown_ttl_s=settings.unknown_key_cache_ttl_s,
        max_unknown=settings.unknown_key_cache_size,
        metrics=metrics,
    )
    inflight = InFlight(registry, timeout_s=settings.redis_timeout_s)
    # What revokes a cached key also ends the key's requests in flight.
    keys.on_change(inflight.changed)
    app[GATEWAY] = Gateway(
        settings=settings,
        redis=redis,
        registry=registry,
        keys=keys,
        job_client=JobClient(settings),
        limiter=Limiter(
            redis,
            settings.names,
            timeout_s=settings.redis_timeout_s,
            lease_ttl_s=settings.lease_ttl_s,
            metrics=metrics,
        ),
        usage=UsageBook(registry, timeout_s=settings.redis_timeout_s),
        inflight=inflight,
        auth_failures=AuthFailures(settings.auth_failures_per_minute),
        metrics=metrics,
        closed_jobs=ClosedJobs(redis, settings.names, timeout_s=settings.redis_timeout_s),
        fair_share=FairShare(
            redis,
            settings.names,
            inflight,
            refresh_s=settings.fair_refresh_s,
            queue_slots=int(settings.jobs_max_length * settings.fair_queue_share),
            timeout_s=settings.redis_timeout_s,
            reserve_share=settings.fair_reserve_share,
            metrics=metrics,
        ),
    )
    gateway = app[GATEWAY]
    gateway.fair_share.drain = gateway.job_client.drain
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(stamp_headers)
    app.on_response_prepare.append(security_headers)
    setup_routes(app)
    return app


async def serve(settings: GatewaySettings) -> None:
    """Serve until SIGINT or SIGTERM, then let in-flight requests finish."""
    runner = GatewayRunner(
        create_app(settings),
        handler_cancellation=True,  # notice a vanished caller at once
        keepalive_timeout=settings.keepalive_timeout_s,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log=None,  # the edge middleware logs one line per request
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # SO_REUSEPORT only when asked for several processes: otherwise a second
        # gateway started on a taken port must fail, not quietly share it.
        reuse_port = True if settings.processes > 1 else None
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port)
        await site.start()
        settle_heap(settings.gc_threshold)
        log.info("gateway.listening", address=site.name)
        await stop.wait()
        log.info("gateway.stopping")
    finally:
        await runner.cleanup()


def run(settings: GatewaySettings) -> None:
    """Run the gateway in this process until it is told to stop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))
