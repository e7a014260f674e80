"""The version of the routing table that filed each message (`rules explain --message`).

Messages stored before keep "" (not recorded), except the first message of each
ticket: it was routed by the table recorded on its ticket.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "rules_version",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
    op.execute(
        "UPDATE message SET rules_version = "
        "(SELECT ticket.rules_version FROM ticket WHERE ticket.id = message.ticket_id) "
        "WHERE rule <> '' AND id IN (SELECT MIN(id) FROM message GROUP BY ticket_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("rules_version")
