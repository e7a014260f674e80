"""Logging: one JSON line per event on stdout (the journal takes stdout).

structlog and the standard library share one pipeline, so aiosmtpd's own
`mail.log` lines carry the same fields, including the SMTP session id bound
with `bind_contextvars` for the life of a connection. `mail.log` stays at
WARNING: at INFO it logs every command, at DEBUG message content.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

QUIET_LOGGERS = {
    "mail.log": logging.WARNING,
    "mailparser": logging.ERROR,
    "asyncio": logging.WARNING,
    "alembic": logging.WARNING,  # maild logs what it migrated itself
    "httpx2": logging.WARNING,  # a line per request; the pager logs each page's outcome
}


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]


def configure_logging(
    fmt: str = "json", level: str = "info", stream: IO[str] | None = None
) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) as JSON or console text."""
    renderer: Any
    if fmt == "json":
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
