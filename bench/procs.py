"""Subprocesses the benchmark starts, and what ``/proc`` says about them.

Every process is started in a session of its own, so that a Ctrl-C in the terminal does
not reach it half-way through a measurement and so that its whole process group (LiteLLM's
uvicorn forks workers) can be ended by the group id we were handed. :class:`Processes`
remembers what it started and stops all of it when its ``async with`` block exits, however
it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, NamedTuple, Self

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# pid -> start time (clock ticks after boot) of every process started and not yet stopped,
# for kill_leftovers(); the start time tells our process from a later one given its pid.
_LIVE: dict[int, int] = {}


class BenchError(RuntimeError):
    """Something the benchmark needs did not start, answer or finish."""


@dataclass
class Proc:
    """One started process and the file its output goes to."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (also its process group id: it leads a session of its own)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether it has not exited yet."""
        return self.process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its output, to explain a failure."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts processes and guarantees they are stopped (``async with``)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._started: list[Proc] = []

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
    ) -> Proc:
        """Start ``argv``; its output (or only stderr, with ``stdout_pipe``) goes to a log."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        log: IO[bytes] = log_path.open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                # Own session: Ctrl-C does not hit it mid-run, and its group is ours to end.
                start_new_session=True,
                # The load generator's result line for 1000 streams can be long.
                limit=64 * 1024 * 1024,
            )
        finally:
            log.close()  # the child holds its own descriptor
        proc = Proc(name, process, log_path)
        self._started.append(proc)
        started = _start_time(process.pid)
        if started is not None:
            _LIVE[process.pid] = started
        return proc

    async def stop(self, proc: Proc, timeout: float = 15.0) -> None:  # noqa: ASYNC109 -- a grace period, not a deadline for the caller
        """SIGTERM its process group, SIGKILL what is left after ``timeout`` seconds."""
        if proc not in self._started:
            return
        try:
            # The group, not just the leader: LiteLLM's workers are children of the leader.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.process.wait(), timeout)
            # Children may outlive a leader that exited on SIGTERM: kill the group anyway.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.process.wait(), 5)
        finally:
            self._started.remove(proc)
            _LIVE.pop(proc.pid, None)

    async def stop_all(self) -> None:
        """Stop everything still registered, newest first (clients before servers)."""
        for proc in reversed(list(self._started)):
            # Shielded: a second Ctrl-C must not leave a process behind.
            await asyncio.shield(self.stop(proc))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_all()


def kill_leftovers() -> None:
    """SIGKILL the groups of started processes never stopped (an interrupted shutdown).

    The last resort after the event loop is gone, e.g. on a second Ctrl-C: only processes
    this module started, each recognised by its pid and start time.
    """
    for pid, started in list(_LIVE.items()):
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        _LIVE.pop(pid, None)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_http_ok(
    url: str,
    procs: Iterable[Proc],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 -- a start-up budget, like the services' own
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll GET ``url`` until it answers 200; fail early if one of ``procs`` exits."""
    watched = list(procs)
    deadline = time.monotonic() + timeout
    last = "no answer"
    client_timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        while time.monotonic() < deadline:
            for proc in watched:
                if not proc.running:
                    raise BenchError(
                        f"{proc.name} exited ({proc.process.returncode}) while starting:\n"
                        + proc.log_tail()
                    )
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.2)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in watched)
    raise BenchError(f"{url} not ready after {timeout:.0f} s ({last})\n{tails}")


# --- /proc ------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # starttime: the 22nd field of the whole line.
    return int(fields[19]) if fields is not None else None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            # fields[1] is the parent pid (the 4th field of the whole line).
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of ``pids`` so far, in seconds (vanished ones count 0)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime: the 14th and 15th fields of the whole line.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


class MachineCpu(NamedTuple):
    """CPU seconds of the whole machine so far, all cores added."""

    busy: float  # steal included: time the machine's cores were not free for us
    steal: float  # of it, time the hypervisor gave this VM's virtual cores to others


def machine_cpu_seconds() -> MachineCpu:
    """The machine's busy and stolen CPU time so far, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return MachineCpu((user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK)


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size of ``pids`` added up, in bytes (vanished ones count 0)."""
    total = 0
    for pid in pids:
        try:
            resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
        except (OSError, IndexError):
            continue
        total += int(resident) * PAGE_SIZE
    return total


def listener_pids(port: int) -> list[int]:
    """Processes with a socket listening on TCP ``port`` (any address), e.g. the shared
    RabbitMQ's ``beam.smp`` on 5672: by port, since other servers of the same name (tests'
    private ones) may run on this machine too.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXADDR:HEXPORT; state 0A is LISTEN; the inode is field 10.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found: list[int] = []
    if not inodes:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        links = set()
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile
                links.add(os.readlink(fd))
        if inodes & links:
            found.append(int(entry.name))
    return found
