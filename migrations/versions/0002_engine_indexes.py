"""engine indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_index(
        "uq_streamflow_evidence_consumed_event",
        "streamflow_evidence",
        ["workflow_id", "dedupe_key"],
        unique=True,
        postgresql_where=sa.text("kind = 'event' AND classification = 'consumed'"),
        sqlite_where=sa.text("kind = 'event' AND classification = 'consumed'"),
    )
    op.create_index(
        "ix_streamflow_steps_available_dispatched",
        "streamflow_steps",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text("state = 'available'"),
        sqlite_where=sa.text("state = 'available'"),
    )
    op.create_index(
        "ix_streamflow_steps_lease_expiry",
        "streamflow_steps",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'executing'"),
        sqlite_where=sa.text("state = 'executing'"),
    )
    op.create_index(
        "ix_streamflow_steps_retry_due",
        "streamflow_steps",
        ["scheduled_at"],
        unique=False,
        postgresql_where=sa.text("state = 'retryable'"),
        sqlite_where=sa.text("state = 'retryable'"),
    )


def downgrade() -> None:

    op.drop_index(
        "ix_streamflow_steps_retry_due",
        table_name="streamflow_steps",
        postgresql_where=sa.text("state = 'retryable'"),
        sqlite_where=sa.text("state = 'retryable'"),
    )
    op.drop_index(
        "ix_streamflow_steps_lease_expiry",
        table_name="streamflow_steps",
        postgresql_where=sa.text("state = 'executing'"),
        sqlite_where=sa.text("state = 'executing'"),
    )
    op.drop_index(
        "ix_streamflow_steps_available_dispatched",
        table_name="streamflow_steps",
        postgresql_where=sa.text("state = 'available'"),
        sqlite_where=sa.text("state = 'available'"),
    )
    op.drop_index(
        "uq_streamflow_evidence_consumed_event",
        table_name="streamflow_evidence",
        postgresql_where=sa.text("kind = 'event' AND classification = 'consumed'"),
        sqlite_where=sa.text("kind = 'event' AND classification = 'consumed'"),
    )
