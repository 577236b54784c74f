"""structlog, configured once per process.

Events are stable names with fields (``log.info("job.done", ms=12)``).
``request_id`` is bound at the HTTP edge and carried on the job, so one
request's lines can be found in the gateway's and the worker's logs alike.
Never log an API key or a message body.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from shared.redact import redact_event


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


class UtcStamp:
    """structlog processor: ``timestamp``, the time in UTC as ISO 8601, as
    ``structlog.processors.TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-12-05T02:38:25.377330Z``; no fraction at a whole second, as
    ``datetime.isoformat`` has it), in a quarter of its time: the part to the
    second is formatted once a second, not once a line (3.9 -> 0.9 µs a line;
    every answer logs a line in each service).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["timestamp"] = self.format(time.time())
        return event_dict

    def format(self, now: float) -> str:
        """``now`` (seconds since the epoch) as the line's timestamp."""
        second = int(now)
        micro = round((now - second) * 1_000_000)  # as datetime rounds it
        if micro == 1_000_000:
            second, micro = second + 1, 0
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog (and the stdlib root logger, for libraries) for this process."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    writer = structlog.WriteLogger(out)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            UtcStamp(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: PrintLogger's print() wrote the line and its newline
        # separately, two system calls per line on unbuffered stderr. And one
        # logger for every line: the factory is called for each of them
        # (docs/performance.md).
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp.server, aiohttp.access, aiohttp.web, asyncio, aio-pika) log
    # through the stdlib: warnings and up, rendered as our events (one JSON line,
    # tracebacks inside it) and redacted, since aiohttp quotes request lines.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                UtcStamp(),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event,
                renderer,
            ],
        )
    )
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)


def freeze_logging() -> None:
    """Once a service's logging is configured for good: each logger keeps the
    configuration it first logs with.

    Without this, every line made its logger anew from the configuration
    (structlog's ``cache_logger_on_first_use`` off, its default): the
    gateway's line per request took 14.8 µs, 13.2 with it on (timeit, best of
    five, its five context fields bound). Not in ``configure_logging``: a
    process whose configuration changes after it (``processes.tag_logs``,
    tests capturing lines) must not have loggers that kept the old one.
    """
    structlog.configure(cache_logger_on_first_use=True)
