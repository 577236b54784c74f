"""``--processes N``: a parent that runs N copies of a service and restarts none.

The parent only starts the children, forwards SIGTERM and SIGINT to them, and exits
when they are all done; restarting is an orchestrator's job. Each child gets its own
id (a gateway's reply queue, a worker's control queue are exclusive and named by it)
and tags its log lines with it, since the children share one stderr.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog


class _LineLogger:
    """Writes each line in one ``write``: structlog's ``PrintLogger`` writes the newline
    apart, and the lines of children sharing one pipe then run into each other.

    (A pipe keeps writes up to 4 KiB whole; a longer line may still be split.)
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        """Write one line."""
        self._file.write(message + "\n")
        self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def tag_logs(**fields: object) -> None:
    """Every structlog line of this process carries ``fields``, written in one piece.

    The children of ``--processes N`` share one stderr: each line must say whose it is,
    and must not be cut by another child's.
    """

    def tag(logger: object, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        for name, value in fields.items():
            event.setdefault(name, value)
        return event

    structlog.configure(
        processors=[tag, *structlog.get_config()["processors"]],
        logger_factory=lambda *args: _LineLogger(sys.stderr),
    )


def child_ids(base: str, count: int) -> list[str]:
    """One id per child process: ``base-0``, ``base-1``… (a random base when none is set).

    Each process needs its own: a gateway's names its reply queue, a worker's its
    control queue, and both are exclusive.
    """
    stem = (base or secrets.token_hex(6))[:56]
    return [f"{stem}-{i}" for i in range(count)]


def _status(exit_code: int) -> int:
    """A child's exit code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - exit_code if exit_code < 0 else exit_code


def supervise(argvs: list[list[str]], envs: list[dict[str, str]]) -> int:
    """Run one child per argv, forward SIGTERM and SIGINT to them, return when all ended.

    No child is ever restarted: that is an orchestrator's job (systemd, Kubernetes,
    Compose's ``restart:``). So that it notices, a child that exits unasked makes the
    others stop too, and the exit status is then the failed child's (1 if it was 0,
    128 + N if signal N ended it).
    After a forwarded signal, the status is 0 when every child exited cleanly.
    """
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping: list[int] = []  # the signal that stops the children, once one was sent

    def stop_all(signum: int) -> None:
        if not stopping:
            stopping.append(signum)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def forward(signum: int, frame: object) -> None:
        stop_all(signum)

    # Handlers first: a signal between two starts must not leave a child behind.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for argv, env in zip(argvs, envs, strict=True):
            child = subprocess.Popen(argv, env=env)
            children[child.pid] = child
            if stopping:  # a signal came while starting: this one missed it
                os.kill(child.pid, stopping[0])
        while children:
            pid, status = os.wait()
            if pid not in children:
                continue
            child = children.pop(pid)
            child.returncode = exit_code = os.waitstatus_to_exitcode(status)
            if not stopping:
                print(
                    f"botline: process {pid} exited ({exit_code}) unasked; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                code = _status(exit_code) or 1
                stop_all(signal.SIGTERM)
            elif exit_code not in (0, -stopping[0]) and code == 0:
                # Killed by the very signal forwarded (it came before the child's own
                # handler was installed) is a clean stop too.
                code = _status(exit_code)
    finally:
        stop_all(signal.SIGTERM)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
