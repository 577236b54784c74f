"""What the figures were measured with: software versions and the machine.

Printed above the table and kept in the JSON, since figures from another machine, or with
another RabbitMQ, are not comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

import aio_pika
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.settings import CommonSettings


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def _rabbitmq_version(settings: CommonSettings) -> str:
    """``rabbitmqctl version`` where it exists, else what the broker says on connect."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is not None:
        with contextlib.suppress(OSError, TimeoutError):
            proc = await asyncio.create_subprocess_exec(
                ctl,
                "version",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if proc.returncode == 0 and out.strip():
                return out.decode().strip() + " (rabbitmqctl version)"
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
        async with connection:
            transport = connection.transport
            props = transport.connection.server_properties if transport is not None else {}
            version = props.get("version", b"?")
            text = version.decode() if isinstance(version, bytes) else str(version)
            return text + " (AMQP server properties)"
    return "unknown"


async def _redis_version(settings: CommonSettings) -> str:
    redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)
    try:
        info = await redis.info("server")
        return str(info.get("redis_version", "?"))
    except (RedisError, OSError):
        return "unknown"
    finally:
        await redis.aclose()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    return "unknown"


async def collect(litellm: str) -> dict[str, dict[str, str]]:
    """Versions and machine facts; ``litellm`` is the version found in its own venv."""
    settings = CommonSettings()
    rabbitmq, redis = await asyncio.gather(_rabbitmq_version(settings), _redis_version(settings))
    versions = {
        "python": platform.python_version(),
        "aiohttp": _package("aiohttp"),
        "aio-pika": _package("aio-pika"),
        "redis-py": _package("redis"),
        "botline": _package("botline"),
        "litellm": litellm,
        "uvloop (load generator)": _package("uvloop"),
        "RabbitMQ": rabbitmq,
        "Redis": redis,
    }
    machine = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
    }
    return {"versions": versions, "machine": machine}
