"""structlog, configured once per process.

Events are stable names with fields (``log.info("job.done", ms=12)``).
``request_id`` is bound at the HTTP edge and carried on the job, so one
request's lines can be found in the gateway's and the worker's logs alike.
Never log an API key or a message body.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

from shared.redact import redact_event


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


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
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
                structlog.processors.TimeStamper(fmt="iso", utc=True),
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
