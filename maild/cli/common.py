"""What every `maild` command shares: options, config and database opening, output, exit codes."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from maild import __version__
from maild.config import Settings, default_config_path, load_settings
from maild.errors import ConfigError, MaildError, RulesError
from maild.logs import configure_logging
from maild.mail.display import for_display, json_safe

if TYPE_CHECKING:  # imported where used: `maild --help` stays quick
    from maild.desk.actions import DeskContext
    from maild.outbound.acks import AckPolicy
    from maild.outbound.correspondence import DeskPolicy
    from maild.routing.rules import RuleTable
    from maild.store.database import Database

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75
EX_CONFIG = 78

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Config file [default: $MAILD_CONFIG, else /etc/maild/config.toml]",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def outbox_list_options(noun: str) -> Callable[[F], F]:
    """The options of an outbox's list command (`pages list`, `acks list`)."""
    from maild.enums import OutboxStatus

    options = [
        config_option,
        json_option,
        click.option("--status", type=click.Choice([s.value for s in OutboxStatus])),
        click.option("--ticket", "ticket_id", type=int, help=f"Only this ticket's {noun}."),
        click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True),
    ]

    def wrap(func: F) -> F:
        for option in reversed(options):  # the first listed is the outermost
            func = option(func)
        return func

    return wrap


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"maild: {message}", err=True)
    sys.exit(code)


def load_config(config_path: Path | None, *, quiet: bool = True) -> Settings:
    path = config_path or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    # Commands print their results on stdout; their own log lines go to stderr.
    configure_logging(
        settings.log.format, "warning" if quiet else settings.log.level, stream=sys.stderr
    )
    return settings


def print_json(value: Any) -> None:
    click.echo(json_safe(json.dumps(value, indent=2, ensure_ascii=False)))


def show(text: str) -> None:
    """One line (or block) of human output: controls and bidi controls made visible."""
    click.echo(for_display(text))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        [("" if v is None else for_display(str(v))) for v in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        line = "  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip()
        lines.append(line)
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


_NO_DATABASE = re.compile(r'FATAL:\s+database ".*" does not exist')


def database_problem(name: str, exc: BaseException) -> tuple[str, int]:
    """A database error as one line naming the database, and its exit code: 78 when the
    database does not exist (a wrong URL), else 1."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    # PostgreSQL's invalid_catalog_name. A refused connection carries no SQLSTATE (libpq
    # gives only the server's text), so its message is read too.
    if getattr(orig, "sqlstate", None) == "3D000" or _NO_DATABASE.search(first):
        return f"there is no database {name}: {first}", EX_CONFIG
    return f"database {name} is not usable: {first}", 1


def open_database(settings: Settings, *, create: bool = False, schema: bool = True) -> Database:
    """The configured database, checked: its schema must be this maild's. Only `serve`,
    `ingest` and `db upgrade` may `create` it; every other command on a missing or
    empty database exits 78, naming it and the command that creates it."""
    from maild.store.database import Database, DatabaseMissing

    fix = f"maild db upgrade --config {settings.source}"
    try:
        database = Database(settings.database.url, settings.database.busy_timeout, create=create)
    except DatabaseMissing as exc:
        fail(f"{exc}; create it with `{fix}`", EX_CONFIG)
    except MaildError as exc:
        fail(str(exc), EX_CONFIG)
    if not schema:
        return database
    try:
        database.ensure_schema(settings.source, create=create)
    except MaildError as exc:
        database.close()
        fail(str(exc), EX_CONFIG)
    except SQLAlchemyError as exc:
        database.close()
        fail(*database_problem(database.name, exc))
    return database


def read_with(config_path: Path | None, work: Callable[[Any], T]) -> T:
    """Run one read against the configured database and close it."""
    database = open_database(load_config(config_path))
    try:
        return database.run_read(work)
    except SQLAlchemyError as exc:
        fail(*database_problem(database.name, exc))
    finally:
        database.close()


def write_with(
    config_path: Path | None,
    work: Callable[[Any], T],
    refused: tuple[type[Exception], ...] = (),
) -> T:
    """Run one write (one committed transaction) against the configured database and close
    it; exit 1 with the message of a `refused` error or of a database problem."""
    database = open_database(load_config(config_path))
    try:
        return database.run_write(work)
    except refused as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(*database_problem(database.name, exc))
    finally:
        database.close()


def retry_row(settings: Settings, noun: str, row_id: int, retry: Callable[..., T]) -> T:
    """An outbox row made due again (`pages retry`, `acks retry`); exit 1 naming the problem."""
    from maild.outbound.outbox import NotFound, NotRetryable
    from maild.store.models import utcnow

    database = open_database(settings)
    try:
        return database.run_write(lambda s: retry(s, row_id, utcnow()))
    except NotFound:
        fail(f"no {noun} {row_id}")
    except NotRetryable as exc:
        fail(str(exc))
    finally:
        database.close()


def print_views(
    views: list[dict[str, Any]],
    as_json: bool,
    empty: str,
    headers: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[Any]],
) -> None:
    """A list command's output: JSON, a line saying there is nothing, or a table."""
    if as_json:
        print_json(views)
    elif not views:
        click.echo(empty)
    else:
        click.echo(format_table(headers, [row(v) for v in views]))


def rule_table(settings: Settings) -> RuleTable:
    from maild.routing.rules import load_rules

    try:
        return load_rules(settings.rules.path)
    except RulesError as exc:
        fail(f"the rules table is broken:\n{exc}", EX_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maild")
def main() -> None:
    """maild: email in, support tickets out."""


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def desk_context(settings: Settings) -> DeskContext:
    """The routing table, paging policy and agents, as the daemon builds them: a change the
    CLI makes pages (or resolves) as the same change in the daemon would. The CLI only
    writes the page rows; the running daemon's pager picks them up within a second."""
    from maild.desk.actions import DeskContext

    try:
        return DeskContext.from_settings(settings, rule_table(settings))
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)


def ack_policy(settings: Settings) -> AckPolicy:
    from maild.outbound.acks import AckPolicy

    try:
        return AckPolicy.from_settings(settings.outbound)
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)


def desk_policy(settings: Settings, acks: AckPolicy | None = None) -> DeskPolicy:
    from maild.outbound.correspondence import DeskPolicy

    try:
        return DeskPolicy.from_settings(settings, acks)
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)
