"""longer dedupe keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Completion-event keys are "workflow_id:step:attempt:status"; a 200-character step
    # name did not fit in 200. Batch mode, so SQLite (which rebuilds the table) works too.
    with op.batch_alter_table("streamflow_evidence") as batch:
        batch.alter_column(
            "dedupe_key",
            existing_type=sa.VARCHAR(length=200),
            type_=sa.String(length=300),
            existing_nullable=True,
        )


def downgrade() -> None:
    with op.batch_alter_table("streamflow_evidence") as batch:
        batch.alter_column(
            "dedupe_key",
            existing_type=sa.String(length=300),
            type_=sa.VARCHAR(length=200),
            existing_nullable=True,
        )
