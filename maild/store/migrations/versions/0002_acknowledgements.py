"""Acknowledgements, auto-reply flags and bounces: outmail, outmail_rcpt.

Existing messages become inbound, human, with no automatic reasons.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:09:01.290142
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outmail",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("message_pk", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("claimed_by", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("queued_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("sent_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_pk"], ["message.id"], name=op.f("fk_outmail_message_pk_message")
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["ticket.id"], name=op.f("fk_outmail_ticket_id_ticket")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outmail")),
    )
    with op.batch_alter_table("outmail", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outmail_message_pk"), ["message_pk"], unique=False)
        batch_op.create_index(
            "ix_outmail_status_next_attempt_at", ["status", "next_attempt_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_outmail_ticket_id"), ["ticket_id"], unique=False)

    op.create_table(
        "outmail_rcpt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("outmail_id", sa.Integer(), nullable=False),
        sa.Column("email", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["outmail_id"], ["outmail.id"], name=op.f("fk_outmail_rcpt_outmail_id_outmail")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outmail_rcpt")),
    )
    with op.batch_alter_table("outmail_rcpt", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outmail_rcpt_email_created_at", ["email", "created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outmail_rcpt_outmail_id"), ["outmail_id"], unique=False
        )

    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "direction",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                nullable=False,
                server_default="inbound",
            )
        )
        batch_op.add_column(
            sa.Column(
                "kind",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                nullable=False,
                server_default="human",
            )
        )
        batch_op.add_column(
            sa.Column("auto_reasons", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(sa.Column("report", sa.JSON(), nullable=True))

    with op.batch_alter_table("participant", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("undeliverable_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("undeliverable_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("participant", schema=None) as batch_op:
        batch_op.drop_column("undeliverable_reason")
        batch_op.drop_column("undeliverable_at")

    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("report")
        batch_op.drop_column("auto_reasons")
        batch_op.drop_column("kind")
        batch_op.drop_column("direction")

    with op.batch_alter_table("outmail_rcpt", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outmail_rcpt_outmail_id"))
        batch_op.drop_index("ix_outmail_rcpt_email_created_at")

    op.drop_table("outmail_rcpt")
    with op.batch_alter_table("outmail", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outmail_ticket_id"))
        batch_op.drop_index("ix_outmail_status_next_attempt_at")
        batch_op.drop_index(batch_op.f("ix_outmail_message_pk"))

    op.drop_table("outmail")
