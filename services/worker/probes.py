"""The worker's own HTTP server: liveness and readiness probes.

Served on ``BOTLINE_WORKER_HTTP_HOST:BOTLINE_WORKER_HTTP_PORT`` (127.0.0.1:8081
by default; 0.0.0.0 in containers) for the orchestrator:

- ``GET /livez``: 200 while the event loop answers;
- ``GET /readyz``: 200 while the AMQP connection is open and the job queue is
  being consumed, 503 otherwise (lost broker, draining after SIGTERM), with
  the checks in the body like the gateway's ``/readyz``;
- ``GET /metrics``: the worker's Prometheus metrics (:mod:`services.worker.metrics`).

The routes are one table (:data:`ROUTES`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from services.worker.metrics import WorkerMetrics
from services.worker.settings import WorkerSettings

log = structlog.get_logger("botline.worker.probes")


class Probed(Protocol):
    """What the probes ask of the worker."""

    def readiness(self) -> dict[str, bool]:
        """Named checks; ready when all are true."""
        ...


PROBED = web.AppKey("probed", Probed)
METRICS = web.AppKey("metrics", WorkerMetrics)


async def livez(request: web.Request) -> web.Response:
    """The process runs and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 while the broker connection is down or the worker is not consuming jobs."""
    checks = request.config_dict[PROBED].readiness()
    ready = bool(checks) and all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format of the worker's series."""
    metrics = request.config_dict[METRICS]
    await metrics.refresh()  # the fleet's endpoint states: one Redis read, failing open
    body = metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = [
    web.get("/livez", livez),
    web.get("/readyz", readyz),
    web.get("/metrics", metrics),
]


def create_probe_app(probed: Probed, metrics: WorkerMetrics | None = None) -> web.Application:
    """The probe server's application, asking ``probed`` whether it is ready.

    Without ``metrics`` (a probe server with no worker, in tests), ``/metrics``
    serves an empty worker's series.
    """
    app = web.Application()
    app[PROBED] = probed
    app[METRICS] = metrics if metrics is not None else WorkerMetrics([])
    app.router.add_routes(ROUTES)
    return app


@contextlib.asynccontextmanager
async def serve_probes(
    settings: WorkerSettings, probed: Probed, metrics: WorkerMetrics | None = None
) -> AsyncIterator[str]:
    """Serve the probes while the block runs; yields the base URL actually bound.

    Port 0 binds a free port (tests). The runner is cleaned up on exit,
    whatever ends the block.
    """
    # Probes are short requests: a short keep-alive keeps idle probe
    # connections from piling up (aiohttp's AppRunner default is an hour).
    runner = web.AppRunner(create_probe_app(probed, metrics), access_log=None, keepalive_timeout=15)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.worker_http_host, settings.worker_http_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("worker.probes_listening", host=host, port=port)
        yield url
    finally:
        await runner.cleanup()
