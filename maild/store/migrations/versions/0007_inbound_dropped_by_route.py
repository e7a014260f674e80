"""The route that dropped a delivery, in a column of its own (`rules replay` read it back
out of the error text). Rows dropped before get it from that text.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX = "dropped by route "  # maild.filing.intake.DROPPED_BY_ROUTE as of this revision


def upgrade() -> None:
    with op.batch_alter_table("inbound", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "dropped_by_route", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True
            )
        )
    op.execute(
        sa.text(
            "UPDATE inbound SET dropped_by_route = SUBSTR(error, :start) "
            "WHERE status = 'dropped' AND error LIKE :prefix"
        ).bindparams(start=len(PREFIX) + 1, prefix=PREFIX + "%")
    )


def downgrade() -> None:
    with op.batch_alter_table("inbound", schema=None) as batch_op:
        batch_op.drop_column("dropped_by_route")
