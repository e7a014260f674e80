"""The database schema's version: Alembic migrations shipped in maild/store/migrations.

`maild db upgrade` brings a database to the version this maild needs; `maild
db current` says where it is. `maild serve` and the other commands check
first and refuse an out-of-date schema, naming the command that fixes it. An
empty database (a fresh install) is created at the current version by
`maild serve` and `maild ingest`, so SQLite stays zero-setup.

A database made by maild 0.1's development builds (tables, no version table)
is recognised by its `inbound` table and stamped at the first revision before
upgrading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from maild.errors import MaildError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"


class SchemaError(MaildError):
    """The database schema is not the version this maild needs."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's revision; None when it has none
    head: str  # the revision this maild needs
    empty: bool  # no tables of ours at all (a fresh database)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "maild/store/migrations has no revisions"
    return head


def known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}


def schema_state(engine: Engine) -> SchemaState:
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        tables = set(inspect(connection).get_table_names())
    return SchemaState(current=current, head=head_revision(), empty="inbound" not in tables)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision`; (revision before, revision after)."""
    before = schema_state(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # an index on a large table takes time
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        config = _config(connection)
        if before.current is None and not before.empty:
            command.stamp(config, FIRST_REVISION)  # a pre-migrations development database
        command.upgrade(config, revision)
    return before.current, schema_state(engine).current or ""


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate down to `revision` (the tests of a migration, the benchmark's comparisons)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        command.downgrade(_config(connection), revision)


def previous_revision(revision: str) -> str:
    """The revision `revision` migrates from."""
    script = ScriptDirectory.from_config(_config()).get_revision(revision)
    assert script is not None, revision
    assert isinstance(script.down_revision, str), revision
    return script.down_revision


class SchemaMissing(SchemaError):
    """The database has no maild tables at all (a wrong URL, or never upgraded)."""

    def __init__(self, name: str, config_path: object) -> None:
        super().__init__(
            f"{name} has no maild tables; create them with "
            f"`maild db upgrade --config {config_path}`"
        )


def ensure_current(
    engine: Engine, config_path: str, *, create_if_empty: bool, name: str = "the database"
) -> SchemaState:
    """Raise SchemaError unless the schema is this maild's; create it on an empty database
    when `create_if_empty`. `name` says which database, in the errors."""
    state = schema_state(engine)
    if state.up_to_date:
        return state
    if state.empty and state.current is None and create_if_empty:
        upgrade(engine)
        logging.getLogger("maild.schema").info("created the database schema at %s", state.head)
        return schema_state(engine)
    fix = f"maild db upgrade --config {config_path}"
    if state.empty and state.current is None:
        raise SchemaMissing(name, config_path)
    if state.current is not None and state.current not in known_revisions():
        raise SchemaError(
            f"{name}: the schema is at revision {state.current}, which this maild does not "
            f"know (it needs {state.head}): a newer maild migrated it; run that version"
        )
    raise SchemaError(
        f"{name}: the schema is at revision {state.current or 'none (unversioned)'}, "
        f"this maild needs {state.head}; run `{fix}`"
    )
