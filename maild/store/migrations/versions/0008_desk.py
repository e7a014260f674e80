"""The desk: ticket history, assignee, the desk address a ticket came in through.

- ticket_event: one row per change to a ticket (what, old, new, who, when).
- ticket.assignee (indexed with updated_at, for `tickets list --assignee`).
- ticket.desk_address: the recipient that routed the ticket's first mail, the From of
  the desk's mail about it. Tickets made before keep "", and the desk's mail about them
  comes from `[outbound] from`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 06:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ticket_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("field", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("old", sa.Text(), nullable=True),
        sa.Column("new", sa.Text(), nullable=True),
        sa.Column("by", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["ticket.id"], name=op.f("fk_ticket_event_ticket_id_ticket")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ticket_event")),
    )
    with op.batch_alter_table("ticket_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ticket_event_ticket_id"), ["ticket_id"], unique=False)
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assignee", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True)
        )
        batch_op.add_column(
            sa.Column(
                "desk_address",
                sqlmodel.sql.sqltypes.AutoString(length=320),
                nullable=False,
                server_default="",
            )
        )
        batch_op.create_index(
            "ix_ticket_assignee_updated", ["assignee", "updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.drop_index("ix_ticket_assignee_updated")
        batch_op.drop_column("desk_address")
        batch_op.drop_column("assignee")
    with op.batch_alter_table("ticket_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ticket_event_ticket_id"))
    op.drop_table("ticket_event")
