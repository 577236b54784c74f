"""The worker's probe server: /livez, /readyz, and readiness lost with the broker."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from services.worker.probes import serve_probes
from services.worker.worker import Worker
from tests.support.stack import ProcessFactory, Stack, free_port
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def wait_ready(http: aiohttp.ClientSession, base: str, ready: bool) -> dict[str, object]:
    """Poll /readyz until it says ``ready`` (bounded; readiness has no push channel)."""
    want = 200 if ready else 503
    async with asyncio.timeout(20):
        while True:
            status, body = await get(http, f"{base}/readyz")
            if status == want:
                return body
            await asyncio.sleep(0.05)


async def test_a_worker_process_serves_livez_and_readyz(
    processes: ProcessFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    worker = await processes("worker", BOTLINE_WORKER_HTTP_PORT=str(port))
    await worker.wait_for("worker.probes_listening")
    base = f"http://127.0.0.1:{port}"
    assert await get(http, f"{base}/livez") == (200, {"status": "ok"})
    assert await get(http, f"{base}/readyz") == (
        200,
        {"status": "ready", "checks": {"amqp": True, "consuming": True}},
    )


async def test_readyz_is_503_while_the_broker_is_lost_and_200_again_after(
    bare_stack: Stack,
) -> None:
    http = bare_stack.http
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        worker = await bare_stack.add_worker(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", worker_http_port=0
        )
        async with serve_probes(worker.settings, worker) as base:
            assert (await get(http, f"{base}/readyz"))[0] == 200
            await proxy.down()
            body = await wait_ready(http, base, False)
            assert body["status"] == "unavailable"
            assert body["checks"] == {"amqp": False, "consuming": False}
            # Alive all the same: the orchestrator must not restart it for a broker outage.
            assert await get(http, f"{base}/livez") == (200, {"status": "ok"})
            await proxy.up()
            await wait_ready(http, base, True)


async def test_readyz_is_503_once_the_worker_stops_taking_jobs(bare_stack: Stack) -> None:
    worker = await bare_stack.add_worker(worker_http_port=0)
    async with serve_probes(worker.settings, worker) as base:
        assert (await get(bare_stack.http, f"{base}/readyz"))[0] == 200
        await worker.stop()
        bare_stack.workers.remove(worker)
        status, body = await get(bare_stack.http, f"{base}/readyz")
        assert status == 503
        assert body == {"status": "unavailable", "checks": {"amqp": False, "consuming": False}}


async def test_readyz_is_503_before_the_worker_has_reached_the_broker(
    bare_stack: Stack,
) -> None:
    # serve() starts the probes before connecting: alive, not ready.
    worker = Worker(bare_stack.worker_settings(worker_http_port=0))
    async with serve_probes(worker.settings, worker) as base:
        assert await get(bare_stack.http, f"{base}/livez") == (200, {"status": "ok"})
        assert await get(bare_stack.http, f"{base}/readyz") == (
            503,
            {"status": "unavailable", "checks": {"amqp": False, "consuming": False}},
        )
