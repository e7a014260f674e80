"""Per-address limit keys, and message fingerprints.

- page.sender_key and outmail_rcpt.address_key: the address a per-hour limit counts
  (lower-case, `+tag` removed), indexed with the time instead of the raw address.
- message.fingerprint: sha256 of a message's sender and body, so that a reused
  Message-ID is told from a retry of the same message. Stored messages keep NULL
  (a later copy of one of them is still recognised by its Message-ID alone).

Rows written before the upgrade get their keys computed here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 12:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key(address: str) -> str:
    """maild.store.ratelimit.limit_key as of this revision (migrations do not import the app)."""
    local, at, domain = address.strip().strip("<>").strip().lower().rpartition("@")
    if not at:
        local, domain = domain, ""
    if not local.startswith("+"):
        local = local.partition("+")[0]
    return f"{local}@{domain}" if domain else local


def _backfill(table: str, source: str, target: str) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text(f"SELECT id, {source} FROM {table}")).all()  # noqa: S608
    if rows:
        connection.execute(
            sa.text(f"UPDATE {table} SET {target} = :key WHERE id = :id"),  # noqa: S608
            [{"id": row[0], "key": _key(row[1] or "")} for row in rows],
        )


def upgrade() -> None:
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "sender_key",
                sqlmodel.sql.sqltypes.AutoString(length=320),
                nullable=False,
                server_default="",
            )
        )
        batch_op.drop_index("ix_page_sender_created_at")
        batch_op.create_index(
            "ix_page_sender_key_created_at", ["sender_key", "created_at"], unique=False
        )
    with op.batch_alter_table("outmail_rcpt", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "address_key",
                sqlmodel.sql.sqltypes.AutoString(length=320),
                nullable=False,
                server_default="",
            )
        )
        batch_op.drop_index("ix_outmail_rcpt_email_created_at")
        batch_op.create_index(
            "ix_outmail_rcpt_address_key_created_at", ["address_key", "created_at"], unique=False
        )
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fingerprint", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
    _backfill("page", "sender", "sender_key")
    _backfill("outmail_rcpt", "email", "address_key")


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("fingerprint")
    with op.batch_alter_table("outmail_rcpt", schema=None) as batch_op:
        batch_op.drop_index("ix_outmail_rcpt_address_key_created_at")
        batch_op.create_index(
            "ix_outmail_rcpt_email_created_at", ["email", "created_at"], unique=False
        )
        batch_op.drop_column("address_key")
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.drop_index("ix_page_sender_key_created_at")
        batch_op.create_index("ix_page_sender_created_at", ["sender", "created_at"], unique=False)
        batch_op.drop_column("sender_key")
