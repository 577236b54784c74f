"""``python -m bench.marks DIR -- BOTLINE_EXE ARGS``: a botline command with time marks.

Runs ``botline gateway`` or ``botline worker`` (any ``botline`` command line) with a
few of its functions wrapped so that each call notes ``(mark, time.monotonic_ns())``
in memory; the marks are written to ``DIR/marks.<pid>`` as the process exits. The
monotonic clock is the machine's, shared by every process, so marks of the gateway,
the worker and the caller fall on one timeline (``bench.timeline`` lines them up). A
wrapper adds 0.2-0.3 µs a call in a loop (more on a cold path), about a dozen calls
an answer.

Only for the benchmark's own runs: nothing of this is imported by the services.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


class Mark(NamedTuple):
    """A function whose every call is marked: at its start, or as it returns."""

    label: str
    module: str
    qualname: str  # "function" or "Class.method"
    at_exit: bool = False


# On a whole answer's path, in the order it passes them. "amqp" marks are made in
# both processes (shared code); the process's role is put before every label. The
# socket write is asyncio's stream writer's, which redis-py uses too: off the path of
# a key the gateway has cached.
MARKS = (
    Mark("request in", "services.gateway.middleware", "edge"),
    Mark("request done", "services.gateway.middleware", "edge", at_exit=True),
    Mark("publish", "services.gateway.job_client", "JobClient.submit"),
    Mark("amqp: frames queued", "shared.amqp_frames", "WriteQueue._put"),
    Mark("amqp: socket write", "asyncio.streams", "StreamWriter.write"),
    Mark("amqp: frames read", "shared.amqp_frames", "FrameReader._fill", at_exit=True),
    Mark("job in", "services.worker.worker", "Worker._on_job"),
    Mark("upstream call", "services.worker.upstream_http", "HTTPPool.post"),
    Mark("upstream bytes", "services.worker.upstream_http", "_Connection.data_received"),
    Mark("end event", "services.worker.job_events", "JobEvents.end"),
    Mark("event in", "services.gateway.job_client", "JobClient._on_reply"),
    Mark("answer whole", "services.gateway.chat_run", "ChatRun.complete", at_exit=True),
    Mark("response out", "services.gateway.middleware", "send_now"),
)

_noted: list[tuple[str, int]] = []


def note(label: str) -> None:
    """Mark now."""
    _noted.append((label, time.monotonic_ns()))


def _wrapped(label: str, function: Callable[..., Any], at_exit: bool) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def marked_async(*args: Any, **kwargs: Any) -> Any:
            if not at_exit:
                note(label)
            try:
                return await function(*args, **kwargs)
            finally:
                if at_exit:
                    note(label)

        return marked_async

    @functools.wraps(function)
    def marked(*args: Any, **kwargs: Any) -> Any:
        if not at_exit:
            note(label)
        try:
            return function(*args, **kwargs)
        finally:
            if at_exit:
                note(label)

    return marked


def resolve(mark: Mark) -> tuple[Any, str, Callable[..., Any]]:
    """The module or class that holds a mark's function, its name there, and the function;
    ``LookupError`` if there is none (renamed: fix MARKS)."""
    owner: Any = importlib.import_module(mark.module)
    *path, name = mark.qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    function = getattr(owner, name, None)
    if not callable(function):
        raise LookupError(f"{mark.module}.{mark.qualname} does not exist")
    return owner, name, function


def install(role: str, marks: tuple[Mark, ...] = MARKS) -> list[str]:
    """Wrap every mark's function, each label led by ``role``; returns the labels.

    Run before the services' modules import what they wrap by name (a middleware,
    ``send_now``): ``botline``'s commands import their service only when run.
    Raises ``LookupError`` for a function that does not exist.
    """
    labels = []
    for mark in marks:
        owner, name, function = resolve(mark)
        label = f"{role}: {mark.label}"
        setattr(owner, name, _wrapped(label, function, mark.at_exit))
        labels.append(label)
    return labels


def write(out: Path) -> None:
    """The marks so far, one ``<ns> <label>`` line each, to ``out/marks.<pid>``."""
    with (out / f"marks.{os.getpid()}").open("a") as file:
        file.writelines(f"{ns} {label}\n" for label, ns in _noted)
    _noted.clear()


def main(argv: list[str]) -> int:
    """``DIR -- EXE ARGS``: install the marks, then run ``botline ARGS`` in this process."""
    out, dash, exe, *args = argv
    if dash != "--" or not args:
        raise SystemExit("usage: python -m bench.marks DIR -- BOTLINE_EXE COMMAND [ARGS]")
    install(args[0])
    atexit.register(write, Path(out))
    from services.cli import main as botline

    sys.argv = [exe, *args]
    return botline(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
