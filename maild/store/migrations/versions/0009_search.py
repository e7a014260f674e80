"""Search: the words of every message, senders without case, tickets by application.

- SQLite: `message_search`, an FTS5 table without content of its own, kept by
  triggers on message; PostgreSQL: `message.search_vector`, a stored generated
  tsvector column, under a GIN index. Each holds a message's subject and the
  first 100,000 characters of its text; mail maild writes from a template and
  the desk's copies are left out. Messages stored before are indexed here.
- `ix_message_from_email_folded`: the sender's address without case.
- `ix_ticket_application_updated`, for `tickets list --application`.

None of it but the last is in the models: maild.store.search reads it, and
its `include_name` keeps it out of the schema comparison. Written out here, as
of this revision (migrations do not import the app).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Left out: the message kinds maild writes from a template, and the desk's copies.
# Indexed: a message's subject and the first 100,000 characters of its text.
SQLITE_UPGRADE = (
    # content='': FTS5 keeps the index only; a row is deleted by giving its old values.
    # detail=none, columnsize=0: which messages hold a word, not where in them (searches
    # are words, never phrases or columns); it halves what indexing adds to filing
    # (docs/benchmarks.md, "Searches").
    "CREATE VIRTUAL TABLE message_search USING fts5("
    "subject, text, content='', detail=none, columnsize=0, "
    "tokenize='unicode61 remove_diacritics 0')",
    """INSERT INTO message_search (rowid, subject, text)
    SELECT id, subject, substr(text, 1, 100000) FROM message
    WHERE kind NOT IN ('ack', 'copy', 'notify', 'solved')""",
    """CREATE TRIGGER message_search_insert AFTER INSERT ON message
    WHEN new.kind NOT IN ('ack', 'copy', 'notify', 'solved') BEGIN
        INSERT INTO message_search (rowid, subject, text)
        VALUES (new.id, new.subject, substr(new.text, 1, 100000));
    END""",
    """CREATE TRIGGER message_search_delete AFTER DELETE ON message
    WHEN old.kind NOT IN ('ack', 'copy', 'notify', 'solved') BEGIN
        INSERT INTO message_search (message_search, rowid, subject, text)
        VALUES ('delete', old.id, old.subject, substr(old.text, 1, 100000));
    END""",
    """CREATE TRIGGER message_search_update AFTER UPDATE OF subject, text, kind ON message
    BEGIN
        INSERT INTO message_search (message_search, rowid, subject, text)
        SELECT 'delete', old.id, old.subject, substr(old.text, 1, 100000)
        WHERE old.kind NOT IN ('ack', 'copy', 'notify', 'solved');
        INSERT INTO message_search (rowid, subject, text)
        SELECT new.id, new.subject, substr(new.text, 1, 100000)
        WHERE new.kind NOT IN ('ack', 'copy', 'notify', 'solved');
    END""",
    "CREATE INDEX ix_message_from_email_folded ON message (from_email COLLATE NOCASE)",
)
SQLITE_DOWNGRADE = (
    "DROP INDEX ix_message_from_email_folded",
    "DROP TRIGGER message_search_update",
    "DROP TRIGGER message_search_delete",
    "DROP TRIGGER message_search_insert",
    "DROP TABLE message_search",
)
POSTGRESQL_UPGRADE = (
    # Adding a stored generated column rewrites the table: every stored message is indexed.
    # The characters that glue words into one token for PostgreSQL's parser (addresses,
    # host names, paths, URLs, versions, hyphenated words, tags) become spaces: a word is
    # a run of letters and digits, as FTS5 reads it on SQLite.
    """ALTER TABLE message ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
        CASE WHEN kind IN ('ack', 'copy', 'notify', 'solved') THEN NULL
        ELSE to_tsvector('simple'::regconfig, translate(
            subject || ' ' || left(text, 100000), '.@/\\-+:~=?&%#_<>', '                '
        )) END
    ) STORED""",
    "CREATE INDEX ix_message_search_vector ON message USING gin (search_vector)",
    "CREATE INDEX ix_message_from_email_folded ON message (lower(from_email))",
)
POSTGRESQL_DOWNGRADE = (
    "DROP INDEX ix_message_from_email_folded",
    "ALTER TABLE message DROP COLUMN search_vector",  # and its index
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRESQL_UPGRADE if postgresql else SQLITE_UPGRADE:
        op.execute(statement)
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ticket_application_updated", ["application", "updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.drop_index("ix_ticket_application_updated")
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRESQL_DOWNGRADE if postgresql else SQLITE_DOWNGRADE:
        op.execute(statement)
