"""The schema is managed by the Alembic migrations shipped in maild/store/migrations."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from maild.store.database import Database, describe
from maild.store.models import metadata
from maild.store.schema import (
    FIRST_REVISION,
    SchemaError,
    ensure_current,
    head_revision,
    schema_state,
    upgrade,
)
from maild.store.search import include_name

TABLES = {"inbound", "ticket", "participant", "message", "attachment", "blob", "page"}


def maild(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maild", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.close()


def test_db_upgrade_creates_the_schema_from_empty_and_is_idempotent(
    make_config: Callable[..., Path], database: Database
) -> None:
    """`maild db upgrade` on an empty database reaches head; again, it changes nothing."""
    config = make_config()
    name = describe(database.url)
    database.check()  # an empty database: on SQLite, an empty file
    before = maild(config, "db", "current")
    assert (before.returncode, before.stderr) == (
        78,
        f"maild: {name} has no maild tables; create them with "
        f"`maild db upgrade --config {config}`\n",
    )
    first = maild(config, "db", "upgrade")
    assert (first.returncode, first.stdout) == (
        0,
        f"{name}: schema upgraded from empty to revision {head_revision()}\n",
    )
    again = maild(config, "db", "upgrade", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {
        "database": name,
        "before": head_revision(),
        "after": head_revision(),
        "changed": False,
    }
    after = maild(config, "db", "current", "--json")
    assert after.returncode == 0
    assert json.loads(after.stdout) == {
        "database": name,
        "current": head_revision(),
        "head": head_revision(),
        "up_to_date": True,
    }
    assert (
        maild(config, "db", "current").stdout
        == f"{name}: revision {head_revision()} (up to date)\n"
    )
    assert set(inspect(database.write_engine).get_table_names()) >= TABLES


def test_the_migrations_build_exactly_the_models(database: Database) -> None:
    """After upgrading, Alembic finds no difference between the database and the models
    (the search index aside: store/search.py declares it)."""
    database.create_schema()
    with database.write_engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": include_name}
        )
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_serve_refuses_an_unversioned_schema_until_db_upgrade(
    make_config: Callable[..., Path], database: Database
) -> None:
    """Tables without a version (a development build's database) stop serve with the fix named."""
    upgrade(database.write_engine, FIRST_REVISION)  # the tables those builds made
    with database.write_engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    config = make_config()
    refused = maild(config, "serve")
    assert refused.returncode == 78
    assert refused.stderr == (
        f"maild: refusing to start: {describe(database.url)}: the schema is at revision "
        "none (unversioned), "
        f"this maild needs {head_revision()}; run `maild db upgrade --config {config}`\n"
    )
    listed = maild(config, "tickets", "list")
    assert listed.returncode == 78
    assert f"run `maild db upgrade --config {config}`" in listed.stderr
    upgraded = maild(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert schema_state(database.write_engine).up_to_date
    assert maild(config, "tickets", "list").returncode == 0


def test_a_schema_from_a_newer_maild_is_refused(
    make_config: Callable[..., Path], database: Database
) -> None:
    """A revision this maild does not know means a newer maild migrated it: refuse, say so."""
    database.create_schema()
    with database.write_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="revision 9999, which this maild does not know"):
        ensure_current(database.write_engine, str(make_config()), create_if_empty=True)


def test_serve_and_ingest_create_the_schema_on_an_empty_database(
    make_config: Callable[..., Path], database: Database
) -> None:
    """Zero setup: the first `maild ingest` on an empty database creates the schema."""
    config = make_config()
    raw = b"From: a@customer.example\r\nSubject: first\r\n\r\nhello\r\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maild",
            "ingest",
            "--config",
            str(config),
            "--recipient",
            "support@altis-dxp.com",
            "-",
        ],
        input=raw,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert schema_state(database.write_engine).up_to_date
    assert inspect(database.write_engine).has_table("alembic_version")


def test_upgrading_from_0001_keeps_messages_and_marks_them_inbound_human(
    database: Database,
) -> None:
    """Messages stored before 0002 become inbound, human, with no automatic reasons."""
    upgrade(database.write_engine, FIRST_REVISION)
    with database.write_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO ticket (type, priority, status, subject, requester_email, "
                "requester_name, rule, rules_version, created_at, updated_at) VALUES "
                "('question', 'normal', 'open', 's', 'a@x.example', '', 'support', '', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO message (ticket_id, message_id, message_id_hash, "
                'message_id_synthesized, in_reply_to, "references", from_email, from_name, '
                "\"to\", cc, subject, text, rule, defects, created_at) VALUES (1, 'm@x', 'h', "
                "false, '[]', '[]', 'a@x.example', '', '[]', '[]', 's', 'hello', 'support', "
                "'[]', '2026-01-01 00:00:00')"
            )
        )
    upgrade(database.write_engine)
    with database.write_engine.connect() as connection:
        row = connection.execute(
            text("SELECT direction, kind, auto_reasons, report FROM message")
        ).one()
    assert (row[0], row[1], row[3]) == ("inbound", "human", None)
    assert row[2] in ("[]", [])  # JSON text on SQLite, decoded on PostgreSQL


def test_upgrading_keeps_which_table_and_route_decided_older_mail(database: Database) -> None:
    """0006: the first message of an older ticket gets its ticket's table version, later
    ones none (not recorded). 0007: a delivery dropped by a route gets the route's name,
    read from its error text as `rules replay` read it."""
    upgrade(database.write_engine, "0005")
    with database.write_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO ticket (type, priority, status, subject, requester_email, "
                "requester_name, rule, rules_version, application, tags, created_at, "
                "updated_at) VALUES ('question', 'normal', 'open', 's', 'a@x.example', '', "
                "'support', 'v1', '', '[]', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
        for n in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO message (ticket_id, message_id, message_id_hash, "
                    'message_id_synthesized, in_reply_to, "references", from_email, from_name, '
                    '"to", cc, subject, text, rule, defects, direction, kind, auto_reasons, '
                    "created_at) VALUES (1, :mid, :mid, false, '[]', '[]', 'a@x.example', '', "
                    "'[]', '[]', 's', 'hello', 'support', '[]', 'inbound', 'human', '[]', "
                    "'2026-01-01 00:00:00')"
                ).bindparams(mid=f"m{n}@x")
            )
        for status, error in (("dropped", "dropped by route spam"), ("dropped", "loop: x")):
            connection.execute(
                text(
                    "INSERT INTO inbound (received_at, protocol, peer, helo, session_id, "
                    "mail_from, rcpt_tos, size, sha256, status, error, attempts, raw) VALUES "
                    "('2026-01-01 00:00:00', 'smtp', '', '', '', '', '[]', 0, 'x', :status, "
                    ":error, 0, :raw)"
                ).bindparams(status=status, error=error, raw=b"")
            )
    upgrade(database.write_engine)
    with database.write_engine.connect() as connection:
        versions = connection.execute(text("SELECT rules_version FROM message ORDER BY id")).all()
        routes = connection.execute(text("SELECT dropped_by_route FROM inbound ORDER BY id")).all()
    assert [v for (v,) in versions] == ["v1", ""]
    assert [r for (r,) in routes] == ["spam", None]
