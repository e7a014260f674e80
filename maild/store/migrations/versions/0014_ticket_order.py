"""The ticket lists' order and the requester filter from indexes: ticket (updated_at, id)
and (requester_email, updated_at).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 10:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.create_index("ix_ticket_updated_id", ["updated_at", "id"], unique=False)
        batch_op.create_index(
            "ix_ticket_requester_updated", ["requester_email", "updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.drop_index("ix_ticket_requester_updated")
        batch_op.drop_index("ix_ticket_updated_id")
