"""reconciler indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_streamflow_attempts_recorded_at", "streamflow_attempts", ["recorded_at"], unique=False
    )
    op.drop_index("uq_streamflow_evidence_consumed_event", table_name="streamflow_evidence")
    op.create_index(
        "uq_streamflow_evidence_accounted_event",
        "streamflow_evidence",
        ["workflow_id", "dedupe_key"],
        unique=True,
        postgresql_where=sa.text("kind = 'event' AND classification IN ('consumed', 'dropped')"),
        sqlite_where=sa.text("kind = 'event' AND classification IN ('consumed', 'dropped')"),
    )
    op.create_index(
        "ix_streamflow_steps_finished_at", "streamflow_steps", ["finished_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_streamflow_steps_finished_at", table_name="streamflow_steps")
    op.drop_index(
        "uq_streamflow_evidence_accounted_event",
        table_name="streamflow_evidence",
        postgresql_where=sa.text("kind = 'event' AND classification IN ('consumed', 'dropped')"),
        sqlite_where=sa.text("kind = 'event' AND classification IN ('consumed', 'dropped')"),
    )
    op.create_index(
        "uq_streamflow_evidence_consumed_event",
        "streamflow_evidence",
        ["workflow_id", "dedupe_key"],
        unique=True,
        postgresql_where=sa.text("kind = 'event' AND classification = 'consumed'"),
        sqlite_where=sa.text("kind = 'event' AND classification = 'consumed'"),
    )
    op.drop_index("ix_streamflow_attempts_recorded_at", table_name="streamflow_attempts")
