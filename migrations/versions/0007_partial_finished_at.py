"""steps' finish-time index over finished steps only

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    # No update of a step row is HOT (its state is indexed), so each one adds an entry to
    # every index whose predicate the new row matches. Indexing the NULLs of unfinished
    # steps cost one entry per claim, release and hand-off that nothing ever reads: the
    # reconciler asks for `finished_at >= :since`, which implies this predicate.
    op.drop_index("ix_streamflow_steps_finished_at", table_name="streamflow_steps")
    op.create_index(
        "ix_streamflow_steps_finished_at",
        "streamflow_steps",
        ["finished_at"],
        unique=False,
        postgresql_where=_FINISHED,
        sqlite_where=_FINISHED,
    )


def downgrade() -> None:
    op.drop_index(
        "ix_streamflow_steps_finished_at",
        table_name="streamflow_steps",
        postgresql_where=_FINISHED,
        sqlite_where=_FINISHED,
    )
    op.create_index(
        "ix_streamflow_steps_finished_at", "streamflow_steps", ["finished_at"], unique=False
    )
