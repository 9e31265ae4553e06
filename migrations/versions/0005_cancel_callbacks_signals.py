"""cancel requests, callbacks, signals and awaits

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "streamflow_callbacks",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.String(length=300), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column(
            "args",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("workflow_outcome", sa.String(length=16), nullable=False),
        sa.Column(
            "counters",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "result",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("terminal_cause", sa.String(length=40), nullable=True),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('available','executing','retryable','completed','failed','cancelled')",
            name=op.f("ck_streamflow_callbacks_state"),
        ),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_streamflow_callbacks_max_attempts")),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["streamflow_workflows.id"],
            name=op.f("fk_streamflow_callbacks_workflow_id_streamflow_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", name=op.f("pk_streamflow_callbacks")),
    )
    op.create_index(
        "ix_streamflow_callbacks_available_dispatched",
        "streamflow_callbacks",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text("state = 'available'"),
        sqlite_where=sa.text("state = 'available'"),
    )
    op.create_index(
        "ix_streamflow_callbacks_lease_expiry",
        "streamflow_callbacks",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'executing'"),
        sqlite_where=sa.text("state = 'executing'"),
    )
    op.create_index(
        "ix_streamflow_callbacks_retry_due",
        "streamflow_callbacks",
        ["scheduled_at"],
        unique=False,
        postgresql_where=sa.text("state = 'retryable'"),
        sqlite_where=sa.text("state = 'retryable'"),
    )
    op.create_table(
        "streamflow_signals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=True),
        sa.Column("classification", sa.String(length=20), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("dedupe_key", sa.String(length=300), nullable=True),
        sa.Column("reason", sa.String(length=60), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "classification IN ('consumed','recorded','duplicate','ambiguous','late','unmatched')",
            name=op.f("ck_streamflow_signals_classification"),
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["streamflow_workflows.id"],
            name=op.f("fk_streamflow_signals_workflow_id_streamflow_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_signals")),
    )
    op.create_index(
        op.f("ix_streamflow_signals_workflow_id_id"),
        "streamflow_signals",
        ["workflow_id", "id"],
        unique=False,
    )
    op.create_index(
        "uq_streamflow_signals_first_of_key",
        "streamflow_signals",
        ["workflow_id", "name", "dedupe_key"],
        unique=True,
        postgresql_where=sa.text(
            "dedupe_key IS NOT NULL AND classification NOT IN ('duplicate', 'ambiguous')"
        ),
        sqlite_where=sa.text(
            "dedupe_key IS NOT NULL AND classification NOT IN ('duplicate', 'ambiguous')"
        ),
    )
    op.create_table(
        "streamflow_awaits",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("signal", sa.String(length=200), nullable=False),
        sa.Column("deadline_ms", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("signal_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending','waiting','satisfied','expired','cancelled')",
            name=op.f("ck_streamflow_awaits_state"),
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id", "step"],
            ["streamflow_steps.workflow_id", "streamflow_steps.name"],
            name=op.f("fk_streamflow_awaits_workflow_id_step_streamflow_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "step", name=op.f("pk_streamflow_awaits")),
    )
    op.create_index(
        "ix_streamflow_awaits_deadline",
        "streamflow_awaits",
        ["deadline_at"],
        unique=False,
        postgresql_where=sa.text("state = 'waiting'"),
        sqlite_where=sa.text("state = 'waiting'"),
    )
    op.create_index(
        "uq_streamflow_awaits_signal", "streamflow_awaits", ["workflow_id", "signal"], unique=True
    )
    op.create_table(
        "streamflow_callback_attempts",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('completed','retryable','failed','cancelled')",
            name=op.f("ck_streamflow_callback_attempts_status"),
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["streamflow_callbacks.workflow_id"],
            name=op.f("fk_streamflow_callback_attempts_workflow_id_streamflow_callbacks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workflow_id", "attempt", name=op.f("pk_streamflow_callback_attempts")
        ),
    )
    # Batch mode for the column changes: on SQLite adding the CHECK rebuilds the table
    # (nothing references it), and a plain ADD COLUMN stays an ALTER.
    with op.batch_alter_table("streamflow_cancel_requests") as batch:
        batch.add_column(
            sa.Column(
                "effect", sa.String(length=20), server_default=sa.text("'applied'"), nullable=False
            )
        )
        batch.add_column(
            sa.Column("cancelled_steps", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("workflow_outcome", sa.String(length=16), nullable=True))
        batch.create_check_constraint(
            op.f("ck_streamflow_cancel_requests_effect"),
            "effect IN ('applied','repeated','finished')",
        )
    # A plain ADD COLUMN (no server default): batch mode keeps it an ALTER on SQLite, so
    # the workflows table, which others reference, is not rebuilt.
    with op.batch_alter_table("streamflow_workflows") as batch:
        batch.add_column(
            sa.Column(
                "on_finish",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # Not batch mode: rebuilding the workflows table would cascade-delete every row
        # that references it. SQLite (3.35+) drops a plain column in place.
        op.execute("ALTER TABLE streamflow_workflows DROP COLUMN on_finish")
    else:
        op.drop_column("streamflow_workflows", "on_finish")
    with op.batch_alter_table("streamflow_cancel_requests") as batch:
        batch.drop_constraint(op.f("ck_streamflow_cancel_requests_effect"), type_="check")
        batch.drop_column("workflow_outcome")
        batch.drop_column("cancelled_steps")
        batch.drop_column("effect")
    op.drop_table("streamflow_callback_attempts")
    op.drop_index("uq_streamflow_awaits_signal", table_name="streamflow_awaits")
    op.drop_index(
        "ix_streamflow_awaits_deadline",
        table_name="streamflow_awaits",
        postgresql_where=sa.text("state = 'waiting'"),
        sqlite_where=sa.text("state = 'waiting'"),
    )
    op.drop_table("streamflow_awaits")
    op.drop_index(
        "uq_streamflow_signals_first_of_key",
        table_name="streamflow_signals",
        postgresql_where=sa.text(
            "dedupe_key IS NOT NULL AND classification NOT IN ('duplicate', 'ambiguous')"
        ),
        sqlite_where=sa.text(
            "dedupe_key IS NOT NULL AND classification NOT IN ('duplicate', 'ambiguous')"
        ),
    )
    op.drop_index(op.f("ix_streamflow_signals_workflow_id_id"), table_name="streamflow_signals")
    op.drop_table("streamflow_signals")
    op.drop_index(
        "ix_streamflow_callbacks_retry_due",
        table_name="streamflow_callbacks",
        postgresql_where=sa.text("state = 'retryable'"),
        sqlite_where=sa.text("state = 'retryable'"),
    )
    op.drop_index(
        "ix_streamflow_callbacks_lease_expiry",
        table_name="streamflow_callbacks",
        postgresql_where=sa.text("state = 'executing'"),
        sqlite_where=sa.text("state = 'executing'"),
    )
    op.drop_index(
        "ix_streamflow_callbacks_available_dispatched",
        table_name="streamflow_callbacks",
        postgresql_where=sa.text("state = 'available'"),
        sqlite_where=sa.text("state = 'available'"),
    )
    op.drop_table("streamflow_callbacks")
