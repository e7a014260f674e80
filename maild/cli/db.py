"""`maild db`: the schema's version and upgrades."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from maild.cli.common import (
    EX_CONFIG,
    config_option,
    database_problem,
    fail,
    json_option,
    load_config,
    main,
    open_database,
    print_json,
)


@main.group()
def db() -> None:
    """The database schema: migrations shipped with maild."""


@db.command("upgrade")
@config_option
@json_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(config_path: Path | None, as_json: bool, revision: str) -> None:
    """Migrate the database to this maild's schema (creates it when empty). Safe to rerun."""
    from maild.store.schema import upgrade

    database = open_database(load_config(config_path, quiet=False), create=True, schema=False)
    try:
        before, after = upgrade(database.write_engine, revision)
    except SQLAlchemyError as exc:
        message, code = database_problem(database.name, exc)
        fail(f"migration failed, the database is unchanged: {message}", code)
    finally:
        database.close()
    if as_json:
        print_json(
            {
                "database": database.name,
                "before": before,
                "after": after,
                "changed": before != after,
            }
        )
    elif before == after:
        click.echo(f"{database.name}: schema already at revision {after}")
    else:
        click.echo(f"{database.name}: schema upgraded from {before or 'empty'} to revision {after}")


@db.command("current")
@config_option
@json_option
def db_current(config_path: Path | None, as_json: bool) -> None:
    """The database's schema revision and the one this maild needs (exit 1 if they differ;
    78 when there is no database, or no maild tables in it)."""
    from maild.store.schema import SchemaMissing, schema_state

    settings = load_config(config_path, quiet=False)
    database = open_database(settings, schema=False)
    try:
        state = schema_state(database.write_engine)
    except SQLAlchemyError as exc:
        fail(*database_problem(database.name, exc))
    finally:
        database.close()
    if state.empty and state.current is None:
        fail(str(SchemaMissing(database.name, settings.source)), EX_CONFIG)
    view = {
        "database": database.name,
        "current": state.current,
        "head": state.head,
        "up_to_date": state.up_to_date,
    }
    if as_json:
        print_json(view)
    elif state.up_to_date:
        click.echo(f"{database.name}: revision {state.current} (up to date)")
    else:
        click.echo(
            f"{database.name}: revision {state.current or 'none'}, this maild needs "
            f"{state.head}: run `maild db upgrade --config {settings.source}`"
        )
    if not state.up_to_date:
        sys.exit(1)
