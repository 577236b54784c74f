"""Private Redis, Redis Sentinel and RabbitMQ servers that tests may kill, freeze and restart.

The shared Redis (6379) and RabbitMQ (5672) must never be stopped, so fault tests start their
own servers on free loopback ports, each with its own directory (FIELD-NOTES §12), and break
those. For faults in the network path rather than in the server, use
:class:`tests.support.tcpproxy.TcpProxy` in front of a server instead.

Every server here supports:

* ``await start()``: spawn and wait until it answers its protocol (Redis ``PING``, AMQP
  ``Connection.Start``); returns the seconds it took;
* ``await kill()``: ``SIGKILL``, reaped, port closed (connects are refused);
* ``freeze()`` / ``thaw()``: ``SIGSTOP`` / ``SIGCONT`` - the socket stays open, nothing answers;
* ``await restart()``: kill if running, start again on the same port and data directory;
* ``close()``: synchronous, idempotent kill for finalizers.

No process is left behind: fixtures call ``close()``, an ``atexit`` hook closes whatever is
still alive, and each server process gets ``PR_SET_PDEATHSIG=SIGKILL`` so that it dies with
the pytest process even when pytest itself is killed. That signal is tied to the *thread*
that spawned the server, so spawn from the main thread (async tests and fixtures do); never
spawn from ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

HOST = "127.0.0.1"
REDIS_SERVER = "redis-server"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
# AMQP 0-9-1 protocol header; a ready broker answers with a METHOD frame (Connection.Start).
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_METHOD = b"\x01"
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_live: set[PrivateServer] = set()
_live_lock = threading.Lock()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the spawning thread dies,
    # so a pytest killed by a harness timeout leaves no server behind.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _close_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.close()


atexit.register(_close_all)


# Ports this process gave out: a group of servers picks all its ports before any binds.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nobody listens on, below the ephemeral range.

    Below 32768 so that the kernel does not hand the port to some outgoing connection while a
    killed server is down, which would make ``restart()`` on the same port fail.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue  # free now, but promised to a server that has not bound it yet
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh event loop in a helper thread.

    For synchronous (module/session-scoped) fixtures: pytest-asyncio's loop is not touched.
    Only *waiting* may happen this way - spawn servers in the calling thread first
    (``spawn()``), see the module docstring.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=target, name="private-servers-wait")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, start time) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19]


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every live descendant of ``pid`` as (pid, start time), found through /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry), stat[1]))
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def process_name(pid: int) -> str:
    """The command name of ``pid`` (``/proc/<pid>/comm``), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] != "Z"


def listening_inodes(port: int) -> set[str]:
    """Socket inodes of the IPv4 listeners on ``port`` (from /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            inodes.add(inode)
    return inodes


def owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
    return False


async def port_refuses(port: int) -> bool:
    """Whether a TCP connect to the loopback ``port`` is refused (nobody listens)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # A connect racing a dying listener is reset, not refused: it was still there.
        return False
    writer.close()
    return False


class ServerStartError(RuntimeError):
    """A private server exited or did not answer in time; carries its log's tail."""


class PrivateServer:
    """One private server process: spawn, probe, signals, SIGKILL of it and its children.

    The base of :class:`PrivateRedis` and :class:`PrivateRabbit`; not used on its own.
    """

    name: str
    port: int
    directory: Path
    last_start_s: float | None

    def __init__(self, name: str, port: int | None, directory: Path) -> None:
        self.name = name
        self.port = port if port is not None else free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{name}.log"
        self.last_start_s = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._spawned_at = 0.0

    # Subclasses say how to run and probe the server.
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _keep_stdin_open(self) -> bool:
        return False

    async def _probe(self) -> bool:
        raise NotImplementedError

    def _server_pid(self) -> int:
        """The pid that serves the port (signals go there)."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Spawned and not exited (frozen counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def frozen(self) -> bool:
        """Stopped with SIGSTOP and not thawed yet."""
        return self._frozen

    @property
    def pid(self) -> int | None:
        """Pid of the serving process while running."""
        return self._server_pid() if self.running else None

    def spawn(self) -> None:
        """Start the process without waiting for it (must run in a long-lived thread)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            log.write(f"--- spawn {time.strftime('%H:%M:%S')} port {self.port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv(),
                cwd=self.directory,
                env=self._env(),
                stdin=subprocess.PIPE if self._keep_stdin_open() else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to pytest reaches pytest, not the servers
                preexec_fn=_die_with_parent,
            )
        self._frozen = False
        self._spawned_at = time.monotonic()
        with _live_lock:
            _live.add(self)

    async def wait_ready(self, timeout: float) -> float:  # noqa: ASYNC109 -- test-facing API
        """Poll the protocol probe until it answers; returns seconds since spawn."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ServerStartError(f"{self.name} exited during start\n{self.log_tail()}")
            if await self._probe():
                self.last_start_s = time.monotonic() - self._spawned_at
                return self.last_start_s
            if time.monotonic() > deadline:
                self.close()
                raise ServerStartError(
                    f"{self.name} did not answer within {timeout:.0f}s\n{self.log_tail()}"
                )
            # Nothing to await: the server tells no one it is ready; poll with a deadline.
            await asyncio.sleep(0.05)

    async def start(self, timeout: float = 20.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Spawn and wait until the server answers; returns the seconds it took."""
        self.spawn()
        return await self.wait_ready(timeout)

    def start_blocking(self, timeout: float = 20.0) -> float:
        """``start()`` for synchronous fixtures."""
        self.spawn()
        return run_blocking(self.wait_ready(timeout))

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered."""
        os.kill(self._server_pid(), signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        os.kill(self._server_pid(), signal.SIGCONT)
        self._frozen = False

    async def kill(self) -> None:
        """SIGKILL the server (and its children) and reap it; its port then refuses."""
        await asyncio.to_thread(self.close)

    async def restart(self, timeout: float = 20.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Kill if running, then start again on the same port and directory."""
        if self.running:
            await self.kill()
        return await self.start(timeout)

    def close(self) -> None:
        """Kill and reap; safe to call twice, from finalizers and atexit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            server_pid = self._server_pid()
            children = [c for c in descendants(proc.pid) if c[0] != server_pid]
            # Kill the process that holds the port first: that is the crash a test wants.
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)
            if server_pid != proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            for pid, started in children:
                stat = _proc_stat(pid)
                if stat is not None and stat[1] == started:  # the same process, not a reused pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._frozen = False
        with _live_lock:
            _live.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log file."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis(PrivateServer):
    """A ``redis-server`` (or a Sentinel, ``sentinel=True``) of the test's own.

    No persistence (``save ""``, ``appendonly no``) unless ``config`` says otherwise; extra
    ``config`` lines go into its config file, which a restart reuses (a Sentinel rewrites it).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        config: Sequence[str] = (),
        sentinel: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name or ("sentinel" if sentinel else "redis"), port, directory)
        self.sentinel = sentinel
        self.config_path = directory / f"{self.name}.conf"
        base = [f"port {self.port}", f"bind {HOST}", f"dir {directory}", "daemonize no"]
        if not sentinel:
            base += ['save ""', "appendonly no"]
        self.config_path.write_text("\n".join([*base, *config]) + "\n")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [REDIS_SERVER, str(self.config_path)]
        return [*argv, "--sentinel"] if self.sentinel else argv

    async def _probe(self) -> bool:
        with contextlib.suppress(OSError, TimeoutError):
            return bool(await command(self.port, "PING", timeout=1) == "PONG")
        return False

    async def command(self, *args: str, timeout: float = 2.0) -> Any:  # noqa: ASYNC109
        """Send one command on a fresh connection; returns the decoded reply."""
        return await command(self.port, *args, timeout=timeout)


async def command(port: int, *args: str, timeout: float = 2.0) -> Any:  # noqa: ASYNC109
    """One Redis command on a fresh loopback connection, without any client library.

    Returns str / int / None / list for the RESP2 reply types; raises ``RuntimeError`` on an
    error reply. Used for probes so that they hold no pooled connection between calls.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            parts = [f"*{len(args)}\r\n".encode()]
            for arg in args:
                data = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
            writer.write(b"".join(parts))
            await writer.drain()
            return await _read_reply(reader)
        finally:
            writer.close()


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    line = (await reader.readuntil(b"\r\n"))[:-2]
    kind, rest = line[:1], line[1:].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        return (await reader.readexactly(int(rest) + 2))[:-2].decode()
    if kind == b"*":
        if int(rest) < 0:
            return None
        return [await _read_reply(reader) for _ in range(int(rest))]
    raise RuntimeError(f"unexpected RESP reply {line!r}")


class RedisSentinelGroup:
    """A master, one replica and three Sentinels (quorum 2), all private, on loopback.

    ``down-after-milliseconds`` is ``down_after_ms`` (1000 by default) so a killed master is
    replaced in a few seconds. Use ``sentinel_addresses`` and ``master_name`` to configure a
    client; ``kill_master_and_await_promotion()`` is the HA fault.
    """

    def __init__(
        self,
        directory: Path,
        *,
        master_name: str = "botline",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.master_name = master_name
        # No 5 s wait for more replicas before a sync: there is one, and tests are waiting.
        no_delay = "repl-diskless-sync-delay 0"
        self.master = PrivateRedis(directory / "master", name="master", config=[no_delay])
        self.replica = PrivateRedis(
            directory / "replica",
            name="replica",
            config=[no_delay, f"replicaof {HOST} {self.master.port}"],
        )
        self.sentinels = [
            PrivateRedis(
                directory / f"sentinel{i}",
                name=f"sentinel{i}",
                sentinel=True,
                config=[
                    "sentinel resolve-hostnames no",
                    f"sentinel monitor {master_name} {HOST} {self.master.port} 2",
                    f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                    f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                    f"sentinel parallel-syncs {master_name} 1",
                ],
            )
            for i in range(3)
        ]
        self.last_start_s: float | None = None
        self.last_failover_s: float | None = None
        self.last_switch_seen_s: float | None = None

    @property
    def servers(self) -> list[PrivateRedis]:
        """The two data servers, then the three Sentinels."""
        return [self.master, self.replica, *self.sentinels]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each Sentinel."""
        return [(HOST, s.port) for s in self.sentinels]

    async def _wait_stage(self, servers: list[PrivateRedis], deadline: float) -> None:
        """Wait until ``servers`` answer and the group is ready up to them (see ``_ready``)."""
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                left = max(0.1, deadline - time.monotonic())
                await asyncio.gather(*(s.wait_ready(left) for s in servers))
                while not await self._ready(sentinels=self.sentinels[0] in servers):  # noqa: ASYNC110
                    # Sentinels find each other by hello messages every 2 s; poll with a deadline.
                    await asyncio.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def _started(self, started: float) -> float:
        self.last_start_s = time.monotonic() - started
        print(
            f"private Sentinel group ready to fail over in {self.last_start_s:.1f}s",
            file=sys.stderr,
        )
        return self.last_start_s

    async def start(self, timeout: float = 30.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Start all five and wait until the group can fail over; returns seconds taken.

        The Sentinels start only once the replica is in sync: a Sentinel learns of replicas
        from the master's INFO, which it reads every 10 s, so one that looked too early
        would make the group wait that long.
        """
        started = time.monotonic()
        deadline = started + timeout
        for server in (self.master, self.replica):
            server.spawn()
        await self._wait_stage([self.master, self.replica], deadline)
        for server in self.sentinels:
            server.spawn()
        await self._wait_stage(self.sentinels, deadline)
        return self._started(started)

    def start_blocking(self, timeout: float = 30.0) -> float:
        """``start()`` for synchronous fixtures (spawns here, waits in a helper thread)."""
        started = time.monotonic()
        deadline = started + timeout
        for server in (self.master, self.replica):
            server.spawn()
        run_blocking(self._wait_stage([self.master, self.replica], deadline))
        for server in self.sentinels:
            server.spawn()
        run_blocking(self._wait_stage(self.sentinels, deadline))
        return self._started(started)

    async def _ready(self, *, sentinels: bool) -> bool:
        """The replica is in sync and, with ``sentinels``, each knows it and two peers.

        Without the peers a Sentinel cannot reach quorum and no failover happens.
        """
        info = await self.replica.command("INFO", "replication")
        if "master_link_status:up" not in info:
            return False
        for sentinel in self.sentinels if sentinels else []:
            fields = await sentinel.command("SENTINEL", "master", self.master_name)
            state = dict(zip(fields[::2], fields[1::2], strict=True))
            if state["num-slaves"] != "1" or state["num-other-sentinels"] != "2":
                return False
        return True

    async def master_address(self) -> tuple[str, int]:
        """The master's address as the first answering Sentinel reports it."""
        errors: list[BaseException] = []
        for sentinel in self.sentinels:
            if not sentinel.running or sentinel.frozen:
                continue
            try:
                host, port = await sentinel.command(
                    "SENTINEL", "get-master-addr-by-name", self.master_name, timeout=1
                )
            except (OSError, TimeoutError, RuntimeError) as exc:
                errors.append(exc)
                continue
            return host, int(port)
        raise RuntimeError(f"no Sentinel answered: {errors}")

    async def current_master(self) -> PrivateRedis:
        """The data server the Sentinels currently name as master."""
        _, port = await self.master_address()
        return next(s for s in (self.master, self.replica) if s.port == port)

    async def kill_master_and_await_promotion(self, timeout: float = 30.0) -> float:  # noqa: ASYNC109
        """SIGKILL the current master; wait until the other data server is master everywhere.

        Done means every live Sentinel names the promoted server, none flags it down, and the
        server itself answers ``ROLE`` as master: from then on any Sentinel a client asks
        gives the new address (with only the first Sentinel switched, redis-py can still get
        ``MasterNotFoundError`` from the others). Returns seconds from the kill to that point
        (``last_failover_s``; ``last_switch_seen_s`` is when the first Sentinel named it);
        raises ``TimeoutError`` past ``timeout``.
        """
        old = await self.current_master()
        new = self.replica if old is self.master else self.master
        await old.kill()
        killed = time.monotonic()
        self.last_switch_seen_s = None
        async with asyncio.timeout(timeout):
            # Sentinel announces +switch-master on pub/sub, but one subscription per Sentinel
            # would still not say when all agree; poll with a deadline instead.
            while not await self._promoted(new, killed):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        self.last_failover_s = time.monotonic() - killed
        print(
            f"private Sentinel group: master :{old.port} killed, :{new.port} named by a Sentinel"
            f" after {self.last_switch_seen_s:.1f}s, by all and serving after"
            f" {self.last_failover_s:.1f}s",
            file=sys.stderr,
        )
        return self.last_failover_s

    async def _promoted(self, new: PrivateRedis, killed: float) -> bool:
        agreed = 0
        live = [s for s in self.sentinels if s.running and not s.frozen]
        for sentinel in live:
            try:
                fields = await sentinel.command("SENTINEL", "master", self.master_name, timeout=1)
            except (OSError, TimeoutError, RuntimeError):
                continue
            state = dict(zip(fields[::2], fields[1::2], strict=True))
            if int(state["port"]) != new.port:
                continue
            if self.last_switch_seen_s is None:
                self.last_switch_seen_s = time.monotonic() - killed
            if "s_down" not in state["flags"] and "o_down" not in state["flags"]:
                agreed += 1
        if agreed < len(live) or not live:
            return False
        try:
            role = await new.command("ROLE", timeout=1)
        except (OSError, TimeoutError, RuntimeError):
            return False
        return bool(role[0] == "master")

    def close(self) -> None:
        """Kill all five; idempotent."""
        for server in self.servers:
            server.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRabbit(PrivateServer):
    """A RabbitMQ node of the test's own on a free loopback port (FIELD-NOTES §12).

    Its config, plugins file, Mnesia, logs and HOME (Erlang cookie) live in ``directory``;
    a restart reuses them, so durable queues survive a kill. The Erlang VM is run directly as
    the child process (``RABBITMQ_ALLOW_INPUT``: the start script ``exec``s ``erl`` instead of
    staying as a wrapper), so the pid we signal *is* the ``beam.smp`` that listens on the
    port - checked on every start, which keeps the shared node's beam and epmd out of reach.
    Its stdin is a pipe this process holds: if pytest dies, the VM reads EOF and halts.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        nodename: str | None = None,
        extra_config: Sequence[str] = (),
        cookie: str | None = None,
    ) -> None:
        self.nodename = nodename or f"botline-{secrets.token_hex(4)}@localhost"
        super().__init__(self.nodename.split("@")[0], port, directory)
        self.dist_port = dist_port if dist_port is not None else free_port()
        self.config_path = directory / "rabbitmq.conf"
        self.config_path.write_text(
            "\n".join(
                [
                    f"listeners.tcp.local = {HOST}:{self.port}",
                    "loopback_users = none",
                    *extra_config,
                ]
            )
            + "\n"
        )
        self.plugins_path = directory / "enabled_plugins"
        self.plugins_path.write_text("")
        self.home = directory / "home"
        self.home.mkdir(exist_ok=True)
        if cookie is not None:  # same cookie on every node of a cluster
            cookie_path = self.home / ".erlang.cookie"
            cookie_path.write_text(cookie)
            cookie_path.chmod(0o400)

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/``."""
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    def _argv(self) -> list[str]:
        return [RABBITMQ_SERVER]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONFIG_FILE=str(self.config_path),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.directory / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.plugins_path),
            RABBITMQ_ALLOW_INPUT="1",
        )
        return env

    def _keep_stdin_open(self) -> bool:
        return True

    async def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n <this node> <args>``'s output (~0.5 s a call); raises on failure."""
        env = self._env()
        del env["RABBITMQ_ALLOW_INPUT"]
        argv = [str(Path(RABBITMQ_SERVER).with_name("rabbitmqctl")), "-n", self.nodename, *args]
        done = await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr[-500:]}")
        return done.stdout

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(_AMQP_HEADER)
                    await writer.drain()
                    answered = await reader.read(1) == _FRAME_METHOD
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False
        if answered:
            self._check_listener()
        return answered

    def _check_listener(self) -> None:
        assert self._proc is not None
        if not owns_listener(self._proc.pid, self.port):
            self.close()
            raise ServerStartError(
                f"{self.name}: port {self.port} answers, but not from our beam.smp "
                f"(pid {self._proc.pid}); refusing to signal an unknown process"
            )

    async def wait_ready(self, timeout: float) -> float:  # noqa: ASYNC109 -- test-facing API
        """As for every server, and prints the start time (a node takes ~6-15 s here)."""
        seconds = await super().wait_ready(timeout)
        print(
            f"private RabbitMQ {self.nodename} on :{self.port} up in {seconds:.1f}s",
            file=sys.stderr,
        )
        return seconds

    async def start(self, timeout: float = 90.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Spawn the node and wait until it answers AMQP; returns the seconds it took."""
        return await super().start(timeout)

    def start_blocking(self, timeout: float = 90.0) -> float:
        """``start()`` for synchronous fixtures."""
        return super().start_blocking(timeout)

    async def restart(self, timeout: float = 90.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Kill if running, start again on the same port, node name and data directory."""
        return await super().restart(timeout)


async def start_all(*servers: PrivateServer, timeout: float = 90.0) -> list[float]:  # noqa: ASYNC109
    """Start servers concurrently (two RabbitMQ nodes take about as long as one)."""
    for server in servers:
        server.spawn()
    try:
        return list(await asyncio.gather(*(s.wait_ready(timeout) for s in servers)))
    except BaseException:
        for server in servers:
            server.close()
        raise


def start_all_blocking(*servers: PrivateServer, timeout: float = 90.0) -> list[float]:
    """``start_all()`` for synchronous fixtures: spawns here, waits in a helper thread."""
    for server in servers:
        server.spawn()

    async def wait() -> list[float]:
        return list(await asyncio.gather(*(s.wait_ready(timeout) for s in servers)))

    try:
        return run_blocking(wait())
    except BaseException:
        for server in servers:
            server.close()
        raise


class PrivateRabbitCluster:
    """``size`` private RabbitMQ nodes joined in one cluster (classic-config peer discovery).

    The nodes share an Erlang cookie (written to each node's HOME) and register with the
    machine's epmd under unique names; they start concurrently. Each node keeps its own
    port, so ``urls`` is what a client that tries several brokers in turn is given. Kill,
    freeze and restart single nodes through ``nodes``. RabbitMQ's rule applies: the last node
    to go down must be the first back up, so restart a killed node while another one runs.
    A quorum queue needs a majority of nodes: with ``size=2`` it is lost with either node.
    """

    def __init__(self, directory: Path, *, size: int = 2) -> None:
        tag = secrets.token_hex(3)
        names = [f"botline-{tag}-{i}@localhost" for i in range(size)]
        cookie = secrets.token_hex(16)
        # Node 0 is the seed and boots alone; the others list it and keep retrying until it
        # answers. If every node listed every other, each would give up after 10 x 500 ms
        # and boot alone when the seed is slow: two clusters, never joined.
        joiner = [
            "cluster_formation.peer_discovery_backend = classic_config",
            f"cluster_formation.classic_config.nodes.1 = {names[0]}",
            "cluster_formation.discovery_retry_limit = 240",
            "cluster_formation.discovery_retry_interval = 500",
        ]
        self.nodes = [
            PrivateRabbit(
                directory / name.split("@")[0],
                nodename=name,
                cookie=cookie,
                extra_config=joiner if i else (),
            )
            for i, name in enumerate(names)
        ]
        self.last_start_s: float | None = None

    @property
    def urls(self) -> list[str]:
        """Each node's AMQP URL, in node order."""
        return [node.url for node in self.nodes]

    async def start(self, timeout: float = 120.0) -> float:  # noqa: ASYNC109 -- test-facing API
        """Start every node concurrently; wait until each answers AMQP and all have joined."""
        started = time.monotonic()
        await start_all(*self.nodes, timeout=timeout)
        await self.wait_joined(timeout=max(1.0, timeout - (time.monotonic() - started)))
        self.last_start_s = time.monotonic() - started
        return self.last_start_s

    def start_blocking(self, timeout: float = 120.0) -> float:
        """``start()`` for synchronous fixtures (spawns here, waits in a helper thread)."""
        started = time.monotonic()
        start_all_blocking(*self.nodes, timeout=timeout)
        run_blocking(self.wait_joined(timeout=max(1.0, timeout - (time.monotonic() - started))))
        self.last_start_s = time.monotonic() - started
        return self.last_start_s

    async def running_nodes(self, via: PrivateRabbit | None = None) -> list[str]:
        """Node names the cluster reports running, asked of ``via`` (first live node)."""
        node = via or next(n for n in self.nodes if n.running and not n.frozen)
        status: dict[str, Any] = json.loads(await node.ctl("cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    async def wait_joined(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 -- test-facing API
        """Wait until every node is in the cluster's running nodes."""
        wanted = sorted(n.nodename for n in self.nodes)
        async with asyncio.timeout(timeout):
            # rabbitmqctl is the only way to ask; each call takes ~0.5 s, so poll slowly.
            while await self.running_nodes() != wanted:  # noqa: ASYNC110 -- nothing to await
                await asyncio.sleep(0.5)

    def close(self) -> None:
        """Kill every node; idempotent."""
        for node in self.nodes:
            node.close()
