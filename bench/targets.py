"""Starting and stopping what is measured: the fake upstreams and the three targets.

- the fake upstream, ``tests/support/fake_openai.py``, one process per reply shape;
- ``direct``: the load generator calls the fake upstream itself (the floor of any proxy);
- ``botline``: ``botline worker`` and ``botline gateway`` on the running RabbitMQ and Redis,
  in a namespace of their own that is deleted afterwards, with bots on the fake upstream;
- ``litellm``: LiteLLM's proxy from PyPI, in a virtual environment of its own that this
  module creates (``bench/.venv-litellm``) from the pinned ``bench/requirements-litellm.txt``,
  configured against the same fake upstream, without a database or callbacks.

Each target is an async context manager: its processes are stopped, and botline's
namespace deleted, when the block exits, whatever the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
from redis.asyncio import Redis

from bench.procs import BenchError, Proc, Processes, free_port, process_tree, wait_http_ok
from shared.amqp import delete_namespace
from shared.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_REQUIREMENTS = ROOT / "bench" / "requirements-litellm.txt"
# Written after a successful install: the requirements it was made from.
_LITELLM_STAMP = LITELLM_VENV / ".bench-requirements"
LITELLM_MASTER_KEY = "sk-bench-master-key"
LITELLM_WORKERS = 2  # botline runs two processes too: one gateway and one worker

# The `model` each workload sends; LiteLLM routes on it, the others ignore it.
MODELS = {"whole": "bench-whole", "stream": "bench-stream", "slow": "bench-slow"}
# botline's endpoint (and bot) per upstream.
_ENDPOINTS = {"whole": "fake", "stream": "fake-stream", "slow": "fake-slow"}
# Enough for 1000 concurrent streams, for LiteLLM's connection pool: not a limit being
# measured (botline runs at its own defaults).
_MAX_CONNECTIONS = 2000


@dataclass(frozen=True)
class Upstream:
    """One fake OpenAI-compatible server process."""

    role: str  # "whole" or "stream": which workloads it answers
    tokens: int
    delay_ms: float
    port: int
    proc: Proc

    @property
    def base_url(self) -> str:
        """Its base URL, with ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass(frozen=True)
class Route:
    """Where and how a target is called for one kind of workload."""

    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Target:
    """A system under test, as the workloads see it."""

    name: str
    processes: str  # said in the output, e.g. "2 (1 gateway + 1 worker)"
    routes: dict[str, Route]  # by upstream role
    # The target's own processes now, by name; CPU time is reported per group.
    groups: Callable[[], dict[str, list[int]]]
    # The groups whose memory growth per open stream is reported, added up.
    memory_groups: tuple[str, ...]
    # The processes that must stay up: a run after one died would measure nothing.
    procs: tuple[Proc, ...] = ()


async def start_upstream(
    procs: Processes, role: str, *, tokens: int, delay_ms: float = 0.0
) -> Upstream:
    """Start ``python -m tests.support.fake_openai`` answering ``tokens`` tokens per reply."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.support.fake_openai", "--port", str(port)]
    argv += ["--tokens", str(tokens), "--delay-ms", str(delay_ms)]
    proc = await procs.start(f"upstream-{role}", argv, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)))
    upstream = Upstream(role, tokens, delay_ms, port, proc)
    await wait_http_ok(f"{upstream.base_url}/models", [proc], timeout=30)
    return upstream


def direct(upstreams: Mapping[str, Upstream]) -> Target:
    """The fake upstream called with no proxy in between."""
    routes = {role: Route(f"{up.base_url}/chat/completions", {}) for role, up in upstreams.items()}
    return Target("direct", "0 (no proxy)", routes, dict, ())


# --- botline -----------------------------------------------------------------
@dataclass(frozen=True)
class Build:
    """A botline to run: this checkout, or a build of another commit (``bench.baseline``)."""

    label: str  # how the target is named: "botline", "botline@140364c"
    root: Path  # its source tree: the processes' working directory
    bin: Path  # its virtual environment's bin/


def current_build() -> Build:
    """This checkout, run by the interpreter running the benchmark."""
    return Build("botline", ROOT, Path(sys.executable).parent)


def botline_env(namespace: str, upstreams: Mapping[str, Upstream]) -> dict[str, str]:
    """botline's environment: its defaults, as ``make run`` gets them.

    Only what cannot be a default is set: the namespace, and the endpoints (the fake
    upstreams, each with no setting but where it is: no cap raised). Where Redis and
    RabbitMQ are is taken from the caller; every other BOTLINE_* variable is dropped,
    since the caller's own settings would change what is measured.
    """
    endpoints = {
        _ENDPOINTS[role]: {"kind": "openai", "base_url": up.base_url}
        for role, up in upstreams.items()
    }
    # Where Redis and RabbitMQ are, and the job queue's type (classic or quorum, to
    # compare them), are taken from the caller; nothing else.
    keep = {"BOTLINE_REDIS_URL", "BOTLINE_AMQP_URL", "BOTLINE_JOBS_QUEUE_TYPE"}
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("BOTLINE_") or k in keep) and k not in {"PYTHONPATH", "VIRTUAL_ENV"}
    }
    env.update(
        BOTLINE_NAMESPACE=namespace,
        BOTLINE_ENDPOINTS=json.dumps(endpoints),
        # Not a tuning: the worker's probe server on any free port, since another
        # worker on this machine may hold 8081.
        BOTLINE_WORKER_HTTP_PORT="0",
    )
    return env


async def _cli(build: Build, env: Mapping[str, str], *args: str) -> str:
    """Run ``botline ARGS`` of ``build``; returns its stdout."""
    proc = await asyncio.create_subprocess_exec(
        str(build.bin / "botline"),
        *args,
        env=dict(env),
        cwd=build.root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise BenchError(f"{build.label}: botline {' '.join(args[:2])} failed: {err.decode()}")
    return out.decode()


async def _create_bots(build: Build, env: Mapping[str, str], roles: list[str]) -> dict[str, str]:
    """A bot on each upstream's endpoint and a key for it, made by the build's own
    ``botline`` command (so that its records are in its own format); returns key by role."""
    found = {}
    for role in roles:
        out = await _cli(
            build, env, "bots", "create", "--name", f"bench-{role}",
            "--endpoint", _ENDPOINTS[role], "--model", "fake-model", "--max-reply-tokens", "4096",
        )  # fmt: skip
        bot_id = json.loads(out)["id"]
        found[role] = (await _cli(build, env, "keys", "create", "--bot", bot_id)).strip()
    return found


async def _delete_botline_namespace(redis: Redis, settings: CommonSettings) -> None:
    """Remove the namespace's Redis keys, queues and exchanges."""
    batch: list[bytes | str] = []
    async for name in redis.scan_iter(match=settings.names.all_redis_keys, count=500):
        batch.append(name)
        if len(batch) >= 500:
            await redis.delete(*batch)
            batch.clear()
    if batch:
        await redis.delete(*batch)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        await delete_namespace(channel, settings)


async def _warm_up(
    target: Target, concurrency: int = 32, streams: Sequence[bool] = (False, True)
) -> None:
    """Answers on every route, whole and streamed, many at once, before anything is measured.

    Proves the wiring (botline's worker consumes, the upstreams answer), and pays first-use
    costs outside the measurements: LiteLLM imports much of its code lazily on the first
    calls, in each of its worker processes, which concurrent calls spread over.
    """
    timeout = aiohttp.ClientTimeout(total=120)
    messages = [{"role": "user", "content": "hi"}]

    async def call(session: aiohttp.ClientSession, role: str, route: Route, stream: bool) -> None:
        body = {"model": MODELS[role], "messages": messages, "stream": stream}
        async with session.post(route.url, json=body, headers=route.headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise BenchError(f"{target.name} {role}: HTTP {resp.status}: {text[:300]}")

    async with aiohttp.ClientSession(timeout=timeout) as session:
        for role, route in target.routes.items():
            for stream in streams:
                await asyncio.gather(
                    *(call(session, role, route, stream) for _ in range(concurrency))
                )


def _settings_said(worker_log: Path) -> str:
    """What the worker said of its automatic prefetch (this checkout logs it; older ones not)."""
    with contextlib.suppress(OSError):
        for raw in worker_log.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and line.get("event") == "worker.prefetch":
                    return f"worker prefetch {line['concurrency']} (automatic)"
    return "worker prefetch: not logged by this build"


def botline_name(build: Build, processes: int) -> str:
    """The target's name: ``botline``, ``botline-p2``, ``botline@140364c``."""
    return build.label + (f"-p{processes}" if processes > 1 else "")


@asynccontextmanager
async def botline(
    procs: Processes,
    upstreams: Mapping[str, Upstream],
    build: Build,
    processes: int = 1,
    *,
    wrap: Sequence[str] = (),
    start_s: float = 60.0,
) -> AsyncIterator[Target]:
    """``botline worker`` and ``botline gateway`` of ``build`` in a fresh namespace, at their
    defaults; with ``processes`` > 1, each as ``--processes N``. ``wrap`` runs each under
    another program (``bench.instructions``: valgrind), ``start_s`` is their start-up budget."""
    name = botline_name(build, processes)
    namespace = f"bench{secrets.token_hex(4)}"
    env = botline_env(namespace, upstreams)
    settings = CommonSettings(namespace=namespace)  # Redis and RabbitMQ as the services see them
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    exe = str(build.bin / "botline")
    many = ["--processes", str(processes)] if processes > 1 else []
    port = free_port()
    started: list[Proc] = []
    try:
        keys = await _create_bots(build, env, list(upstreams))
        worker = await procs.start(
            f"{name}-worker", [*wrap, exe, "worker", *many], env=env, cwd=build.root
        )
        started.append(worker)
        argv = [*wrap, exe, "gateway", "--port", str(port), *many]
        gateway = await procs.start(f"{name}-gateway", argv, env=env, cwd=build.root)
        started.append(gateway)
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", started, timeout=start_s)
        url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
        routes = {role: Route(url, {"Authorization": f"Bearer {keys[role]}"}) for role in keys}
        groups = _Trees({"gateway": gateway.pid, "worker": worker.pid})
        said = f"{processes} gateway + {processes} worker processes" + (
            " (+1 parent each)" if processes > 1 else ""
        )
        target = Target(name, said, routes, groups, ("gateway",), (gateway, worker))
        await _warm_up(target)
        # After the warm-up: with --processes N every child has logged by now.
        print(f"{name}: at its defaults; {_settings_said(worker.log_path)}", file=sys.stderr)
        yield target
    finally:
        # Processes first: a live worker or gateway would re-declare what is deleted.
        for proc in reversed(started):
            await procs.stop(proc)
        try:
            await _delete_botline_namespace(redis, settings)
        finally:
            await redis.aclose()


class _Trees:
    """Each named process and its children (``--processes N``), as CPU groups.

    Found again only when one of them has gone, since scanning /proc every sample would
    cost the machine CPU during the runs.
    """

    def __init__(self, leaders: dict[str, int]) -> None:
        self._leaders = leaders
        self._groups: dict[str, list[int]] = {}

    def __call__(self) -> dict[str, list[int]]:
        pids = [p for group in self._groups.values() for p in group]
        if not pids or not all(Path(f"/proc/{p}").exists() for p in pids):
            self._groups = {name: process_tree(pid) for name, pid in self._leaders.items()}
        return self._groups


# --- the design's floor -------------------------------------------------------
@asynccontextmanager
async def floor(
    procs: Processes, upstreams: Mapping[str, Upstream], http: str = "raw", guarded: bool = False
) -> AsyncIterator[Target]:
    """``bench.floor``'s front and relay on the whole-answer upstream: the least path of
    botline's design (two broker hops, two processes, nothing else), whole answers only;
    the front's HTTP served by ``http``: "raw" (its own protocol) or "aiohttp"; with
    ``guarded``, RabbitMQ asked for what botline's guarantees ask of it (bench/floor.py)."""
    name = "floor-guarded" if guarded else "floor" if http == "raw" else f"floor-{http}"
    said = ["--guarded"] if guarded else []
    whole = upstreams["whole"]
    queue = f"benchfloor{secrets.token_hex(4)}.jobs"  # auto-deleted with its consumer
    base = [sys.executable, "-m", "bench.floor"]
    endpoint = f"{whole.base_url}/chat/completions"
    port = free_port()
    started: list[Proc] = []
    try:
        # RabbitMQ: the first of BOTLINE_AMQP_URL's, from the environment (as botline's).
        argv = [*base, "relay", "--queue", queue, "--endpoint", endpoint, *said]
        started.append(await procs.start(f"{name}-relay", argv, cwd=ROOT, env=_env()))
        argv = [*base, "front", "--queue", queue, "--port", str(port), "--http", http, *said]
        started.append(await procs.start(f"{name}-front", argv, cwd=ROOT, env=_env()))
        await wait_http_ok(f"http://127.0.0.1:{port}/ready", started, timeout=30)
        relay, front = started
        groups = {"front": [front.pid], "relay": [relay.pid]}
        route = Route(f"http://127.0.0.1:{port}/v1/chat/completions", {})
        target = Target(
            name,
            "2 (1 front + 1 relay)",
            {"whole": route},
            lambda: groups,
            (),
            (front, relay),
        )
        await _warm_up(target, streams=(False,))
        yield target
    finally:
        for proc in reversed(started):
            await procs.stop(proc)


# --- LiteLLM -------------------------------------------------------------------
async def run_logged(procs: Processes, name: str, argv: list[str], timeout: float) -> None:  # noqa: ASYNC109 -- an install's budget
    proc = await procs.start(name, argv, cwd=ROOT, env=_env())
    try:
        code = await asyncio.wait_for(proc.process.wait(), timeout)
    finally:
        await procs.stop(proc)
    if code != 0:
        raise BenchError(f"{' '.join(argv)} failed ({code}):\n{proc.log_tail()}")


async def ensure_litellm(procs: Processes) -> Path:
    """The ``litellm`` command of ``bench/.venv-litellm``, installed first if needed."""
    wanted = LITELLM_REQUIREMENTS.read_text()
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists() and _LITELLM_STAMP.exists() and _LITELLM_STAMP.read_text() == wanted:
        return exe
    print(f"installing LiteLLM into {LITELLM_VENV} (once; a few minutes)", file=sys.stderr)
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        # The project's interpreter: a venv made from a venv is based on the base Python.
        await run_logged(
            procs, "litellm-venv", [sys.executable, "-m", "venv", str(LITELLM_VENV)], 300
        )
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    await run_logged(procs, "litellm-install", [*pip, "-r", str(LITELLM_REQUIREMENTS)], 1500)
    _LITELLM_STAMP.write_text(wanted)
    return exe


async def litellm_version() -> str:
    """The installed LiteLLM's version, from its own interpreter."""
    python = LITELLM_VENV / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    proc = await asyncio.create_subprocess_exec(
        str(python), "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode().strip() or "?"


def _litellm_config(upstreams: Mapping[str, Upstream]) -> dict[str, object]:
    """The proxy's config: one model per upstream, nothing else switched on."""
    models = [
        {
            "model_name": MODELS[role],
            "litellm_params": {
                "model": "openai/fake-model",
                "api_base": up.base_url,
                "api_key": "fake",
            },
        }
        for role, up in upstreams.items()
    ]
    return {
        "model_list": models,
        "litellm_settings": {
            # No logging or callbacks: the proxy alone is measured. (This LiteLLM has no
            # telemetry left to switch off: its --telemetry flag is a no-op.)
            "set_verbose": False,
            "json_logs": False,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "turn_off_message_logging": True,
            "request_timeout": 300,
        },
        "general_settings": {
            # A fixed master key, so that LiteLLM checks a key on every call as botline does.
            "master_key": LITELLM_MASTER_KEY,
            "disable_spend_logs": True,
            "disable_error_logs": True,
        },
    }


def _write_litellm_config(work_dir: Path, upstreams: Mapping[str, Upstream]) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "litellm-config.yaml"
    # JSON is YAML: no YAML library needed here.
    config.write_text(json.dumps(_litellm_config(upstreams), indent=2))
    return config


def _litellm_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in _env().items()
        # No database: LiteLLM would use one if the environment named it.
        if k not in {"DATABASE_URL", "DIRECT_URL", "DATABASE_HOST", "REDIS_HOST", "REDIS_URL"}
    }
    env.update(
        # The cost map is otherwise fetched from the internet at start-up (retried).
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        # PRODUCTION: do not load a .env file found above the install folder.
        LITELLM_MODE="PRODUCTION",
        LITELLM_LOG="ERROR",
        # Its default per-host pool (500 a worker) could queue 1000 streams: match botline.
        AIOHTTP_CONNECTOR_LIMIT=str(_MAX_CONNECTIONS),
        AIOHTTP_CONNECTOR_LIMIT_PER_HOST=str(_MAX_CONNECTIONS),
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


@asynccontextmanager
async def litellm(
    procs: Processes, upstreams: Mapping[str, Upstream], work_dir: Path
) -> AsyncIterator[Target]:
    """LiteLLM's proxy with ``LITELLM_WORKERS`` uvicorn workers, no database."""
    exe = await ensure_litellm(procs)
    config = _write_litellm_config(work_dir, upstreams)
    port = free_port()
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", str(LITELLM_WORKERS)]
    proc = await procs.start("litellm", argv, env=_litellm_env(), cwd=work_dir)
    try:
        auth = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
        await wait_http_ok(
            f"http://127.0.0.1:{port}/health/readiness", [proc], timeout=180, headers=auth
        )
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        tree = _LiteLLMTree(proc.pid)
        target = Target(
            "litellm",
            f"{LITELLM_WORKERS} uvicorn workers (+1 supervisor)",
            {role: Route(url, auth) for role in upstreams},
            tree,
            tuple(tree()),
            (proc,),
        )
        await _warm_up(target)
        yield target
    finally:
        await procs.stop(proc)


class _LiteLLMTree:
    """LiteLLM's processes by role: ``supervisor``, ``worker1``, ``worker2``, ``other``.

    Per worker, so that an uneven spread of connections over the workers shows. Found once
    and again only when one of them has gone (uvicorn replaces a worker it finds stuck),
    since scanning /proc every sample would cost the machine CPU during the runs.
    """

    def __init__(self, leader: int) -> None:
        self._leader = leader
        self._groups: dict[str, list[int]] = {}

    def __call__(self) -> dict[str, list[int]]:
        pids = [p for group in self._groups.values() for p in group]
        if not pids or not all(Path(f"/proc/{p}").exists() for p in pids):
            self._groups = self._find()
        return self._groups

    def _find(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"supervisor": [self._leader], "other": []}
        workers = 0
        for pid in sorted(process_tree(self._leader)):
            if pid == self._leader:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:  # a uvicorn worker (multiprocessing spawn)
                workers += 1
                groups[f"worker{workers}"] = [pid]
            else:  # multiprocessing's resource tracker, and anything else it runs
                groups["other"].append(pid)
        return groups


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}
