"""Running botline for tests: in-process gateways and workers, and real processes.

In-process pieces are quick and let tests look inside; processes are what
SIGKILL, SIGTERM and "a second gateway" tests need. Either way they talk to
the real Redis and RabbitMQ, isolated by a namespace of their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from services.gateway.app import create_app
from services.gateway.http_server import GatewayRunner
from services.gateway.resources import GATEWAY, Gateway
from services.gateway.settings import GatewaySettings
from services.worker.settings import EndpointConfig, WorkerSettings
from services.worker.worker import Worker
from shared.records import Bot
from shared.registry import Registry
from tests.support.client import ChatResult, chat
from tests.support.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("BOTLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("BOTLINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


# A clean-up that takes longer than this is a hang: it fails with every task's stack.
CLEANUP_LIMIT_S = 30.0


async def within(seconds: float, what: str, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable``; past ``seconds``, fail naming ``what`` and where each task waits."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task}, timeout=seconds)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    # Where everything waits, taken before the cancellation unwinds it.
    stacks = "\n".join(_awaiting(t) for t in asyncio.all_tasks())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise AssertionError(f"{what} did not finish within {seconds} s; the tasks:\n{stacks}")


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: its whole chain of awaits (``print_stack`` shows one frame)."""
    lines = [repr(task)]
    step: Any = task.get_coro()
    while step is not None:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        frame = frame or getattr(step, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        else:
            lines.append(f"  {step!r}")
        step = (
            getattr(step, "cr_await", None)
            or getattr(step, "gi_yieldfrom", None)
            or getattr(step, "ag_await", None)
        )
    return "\n".join(lines)


async def start_gateway(settings: GatewaySettings) -> tuple[web.AppRunner, str]:
    """Serve a gateway on a random loopback port; returns its runner and base URL."""
    runner = GatewayRunner(create_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_endpoints(upstream_url: str | None) -> dict[str, EndpointConfig]:
    """Endpoints every test worker knows: a fast echo, a slow echo and the fake upstream."""
    endpoints = {
        "echo": EndpointConfig(kind="echo", delay_ms=0),
        "echo-slow": EndpointConfig(kind="echo", delay_ms=50),
    }
    if upstream_url:
        endpoints["fake"] = EndpointConfig(kind="openai", base_url=upstream_url, timeout_s=10)
    return endpoints


def process_id(test_name: str, suffix: str) -> str:
    """A gateway or worker id that says which test started it (within the ids' 64 chars)."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", test_name.removeprefix("test_"))
    return f"{slug[: 63 - len(suffix)]}-{suffix}"


@dataclass
class Stack:
    """A namespace's gateways and workers, started on demand and stopped at the end."""

    namespace: str
    registry: Registry
    http: aiohttp.ClientSession
    upstream: FakeOpenAI
    # Names its gateways and workers, so that a leftover queue says which test left it.
    test_name: str = "stack"
    url: str = ""
    _runners: list[web.AppRunner] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def upstream_url(self) -> str:
        """The fake model server's base URL."""
        return self.upstream.base_url

    def gateway_settings(self, **overrides: Any) -> GatewaySettings:
        """Settings of a gateway in this namespace."""
        base: dict[str, Any] = {"namespace": self.namespace, "port": 0}
        return GatewaySettings(**(base | overrides))

    def worker_settings(self, **overrides: Any) -> WorkerSettings:
        """Settings of a worker in this namespace."""
        base: dict[str, Any] = {
            "namespace": self.namespace,
            "endpoints": test_endpoints(self.upstream_url),
            "drain_timeout_s": 5,
        }
        return WorkerSettings(**(base | overrides))

    async def add_gateway(self, **overrides: Any) -> str:
        """Start a gateway; the first one's URL is also ``self.url``."""
        named = {"gateway_id": process_id(self.test_name, f"g{len(self._runners)}")}
        runner, url = await start_gateway(self.gateway_settings(**(named | overrides)))
        self._runners.append(runner)
        self.url = self.url or url
        return url

    def gateway(self, index: int = 0) -> Gateway:
        """The resources of an in-process gateway (to drive its usage flush, say)."""
        return self._runners[index].app[GATEWAY]

    async def add_worker(self, **overrides: Any) -> Worker:
        """Start a worker."""
        named = {"worker_id": process_id(self.test_name, f"w{len(self.workers)}")}
        worker = Worker(self.worker_settings(**(named | overrides)))
        await worker.start()
        self.workers.append(worker)
        return worker

    async def bot_and_key(self, **fields: Any) -> tuple[Bot, str]:
        """A new bot (echo unless told) and a key for it."""
        defaults = {"name": "test", "model": "m"}
        if "endpoints" not in fields:
            defaults["endpoint"] = "echo"
        bot = await self.registry.create_bot(**(defaults | fields))
        key, _ = await self.registry.create_key(bot.id, "test")
        return bot, key

    async def chat(
        self,
        key: str | None,
        body: dict[str, Any] | bytes,
        *,
        path: str = "/v1/chat/completions",
        headers: dict[str, str] | None = None,
    ) -> ChatResult:
        """POST a chat request to the first gateway (see :func:`tests.support.client.chat`)."""
        return await chat(self.http, self.url, key, body, path=path, headers=headers)

    async def close(self) -> None:
        """Stop everything this stack started."""
        for worker in self.workers:
            await within(CLEANUP_LIMIT_S, "stopping an in-process worker", worker.stop())
        for runner in self._runners:
            await within(CLEANUP_LIMIT_S, "stopping an in-process gateway", runner.cleanup())


class Process:
    """A ``botline`` process whose output goes to a log file and is watched for events."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._seen: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process and follow its output."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            *self.args,
            env=self.env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._follow())

    def _event(self, name: str) -> asyncio.Event:
        return self._seen.setdefault(name, asyncio.Event())

    async def _follow(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        with self.log_path.open("ab") as log:
            async for line in self.proc.stdout:
                log.write(line)
                log.flush()
                try:
                    name = orjson.loads(line).get("event")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(name, str):
                    self._event(name).set()

    async def wait_for(self, event: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Wait until the process logged ``event``."""
        async with asyncio.timeout(timeout):
            await self._event(event).wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await within(CLEANUP_LIMIT_S, f"reading the output of {self.args}", self._reader)
        return code

    async def stop(self) -> None:
        """SIGKILL if still running, and reap."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self.proc is not None:
            await self.wait()


def process_env(namespace: str, upstream_url: str | None, **extra: str) -> dict[str, str]:
    """The environment of a ``botline`` process in a test namespace."""
    endpoints = {name: cfg.model_dump() for name, cfg in test_endpoints(upstream_url).items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTLINE_")}
    env.update(
        BOTLINE_NAMESPACE=namespace,
        BOTLINE_ENDPOINTS=orjson.dumps(endpoints).decode(),
        BOTLINE_LOG_FORMAT="json",
        BOTLINE_LOG_LEVEL="debug",
        # The probe server on any free port: tests run many workers at once.
        BOTLINE_WORKER_HTTP_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


async def run_cli(
    namespace: str, *args: str, upstream_url: str | None = None, ok: bool = True
) -> tuple[str, str]:
    """Run the ``botline`` command in a namespace; returns stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env=process_env(namespace, upstream_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert (proc.returncode == 0) == ok, (proc.returncode, err.decode())
    return out.decode(), err.decode()


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kill_all(processes: Iterable[Process]) -> None:
    """SIGKILL every process still running (last-resort cleanup)."""
    for process in processes:
        if process.proc is not None and process.proc.returncode is None:
            process.proc.kill()


ProcessFactory = Callable[..., Awaitable[Process]]


async def replace_worker_when_called(
    upstream: FakeOpenAI, processes: ProcessFactory, doomed: Process, n: int = 1
) -> Process:
    """SIGKILL ``doomed`` once the model got its ``n``-th call; start a fresh worker."""
    await upstream.wait_request(n)
    doomed.signal(signal.SIGKILL)
    await doomed.wait()
    return await processes("worker")
