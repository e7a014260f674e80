"""`maild serve`: the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from maild.cli.common import (
    EX_CONFIG,
    config_option,
    database_problem,
    fail,
    load_config,
    main,
)
from maild.errors import MaildError, RulesError
from maild.logs import configure_logging


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the SMTP (and LMTP) server until SIGTERM."""
    from maild.service import Service
    from maild.tuning import tune_process

    settings = load_config(config_path, quiet=False)
    configure_logging(settings.log.format, settings.log.level)  # the daemon logs to stdout
    try:
        service = Service(settings)
    except RulesError as exc:
        fail(f"refusing to start, the rules table is broken:\n{exc}", EX_CONFIG)
    except MaildError as exc:
        fail(f"refusing to start: {exc}", EX_CONFIG)
    try:
        tune_process()  # the GIL switch interval and malloc's thresholds (maild/tuning.py)
        asyncio.run(service.run())
    except MaildError as exc:  # an out-of-date schema, say
        fail(f"refusing to start: {exc}", EX_CONFIG)
    except OSError as exc:
        fail(f"cannot start: {exc}", 1)
    except SQLAlchemyError as exc:
        from maild.store.database import describe

        message, code = database_problem(describe(settings.database.url), exc)
        fail(f"cannot start: {message}", code)
