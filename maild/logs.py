"""Logging: one JSON line per event on stdout (the journal takes stdout).

structlog and the standard library share one pipeline, so aiosmtpd's own
`mail.log` lines carry the same fields, including the SMTP session id bound
with `bind_contextvars` for the life of a connection. `mail.log` stays at
WARNING: at INFO it logs every command, at DEBUG message content.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

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


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain writer, with the name `add_logger_name` reads."""

    def __init__(self, file: TextIO, name: str = "") -> None:
        super().__init__(file)
        self.name = name


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) as JSON or console text.

    maild's own lines are rendered by structlog and written straight to the
    stream: the standard library's records, handlers and formatter cost as much
    again per line (docs/benchmarks.md, "Measured decisions"), and the daemon logs
    every message twice. The
    standard library's records (aiosmtpd's `mail.log`, alembic, asyncio) go
    through a handler on the same stream with the same processors. Each line,
    from either path, is one write() call, which the stream's buffer does not
    interleave with another. The level is fixed here, for maild's own lines
    and for the standard library's root logger alike.
    """
    out = stream or sys.stdout
    renderer: list[Any]
    if fmt == "json":
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, root.level))

    def logger_factory(*args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(out, str(args[0]) if args else "")

    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            *renderer,
        ],
        logger_factory=logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(root.level),
        cache_logger_on_first_use=False,  # tests and the CLI configure again
    )
