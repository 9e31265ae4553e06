"""indexes for pruning: finished workflows by finish time, live callbacks

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `streamflow prune` takes the oldest finished workflows first: a partial index over
    # finished workflows only, so it stays out of the way of running ones.
    op.create_index(
        "ix_streamflow_workflows_finished_at",
        "streamflow_workflows",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text("state = 'finished'"),
        sqlite_where=sa.text("state = 'finished'"),
    )
    # ...and skips those whose `on_finish` callback may still run: the live callbacks are
    # few, so this index is tiny, and the check never reads the whole callbacks table.
    op.create_index(
        "ix_streamflow_callbacks_live",
        "streamflow_callbacks",
        ["workflow_id"],
        unique=False,
        postgresql_where=sa.text("state IN ('available', 'executing', 'retryable')"),
        sqlite_where=sa.text("state IN ('available', 'executing', 'retryable')"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_streamflow_callbacks_live",
        table_name="streamflow_callbacks",
        postgresql_where=sa.text("state IN ('available', 'executing', 'retryable')"),
        sqlite_where=sa.text("state IN ('available', 'executing', 'retryable')"),
    )
    op.drop_index(
        "ix_streamflow_workflows_finished_at",
        table_name="streamflow_workflows",
        postgresql_where=sa.text("state = 'finished'"),
        sqlite_where=sa.text("state = 'finished'"),
    )
