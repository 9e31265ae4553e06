"""initial ledger

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "streamflow_evidence",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("classification", sa.String(length=20), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("reason", sa.String(length=60), nullable=True),
        sa.Column("dedupe_key", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_evidence")),
    )
    op.create_index(
        op.f("ix_streamflow_evidence_workflow_id_id"),
        "streamflow_evidence",
        ["workflow_id", "id"],
        unique=False,
    )
    op.create_table(
        "streamflow_reconciler_passes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host", sa.String(length=200), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "summary",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_reconciler_passes")),
    )
    op.create_table(
        "streamflow_recoveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("pass_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=True),
        sa.Column("repair", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "evidence",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_recoveries")),
    )
    op.create_index(
        op.f("ix_streamflow_recoveries_pass_id"), "streamflow_recoveries", ["pass_id"], unique=False
    )
    op.create_index(
        op.f("ix_streamflow_recoveries_workflow_id_id"),
        "streamflow_recoveries",
        ["workflow_id", "id"],
        unique=False,
    )
    op.create_table(
        "streamflow_workflows",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("semantics_version", sa.SmallInteger(), nullable=False),
        sa.Column(
            "context",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("step_count", sa.Integer(), nullable=False),
        sa.Column("pending_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("available_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("executing_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("retryable_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("completed_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("cancelled_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("needs_review", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('completed','failed','cancelled')",
            name=op.f("ck_streamflow_workflows_outcome"),
        ),
        sa.CheckConstraint(
            "state IN ('running','finished')", name=op.f("ck_streamflow_workflows_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_workflows")),
    )
    op.create_index(
        op.f("ix_streamflow_workflows_name_created_at"),
        "streamflow_workflows",
        ["name", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_streamflow_workflows_state_created_at"),
        "streamflow_workflows",
        ["state", "created_at"],
        unique=False,
    )
    op.create_table(
        "streamflow_cancel_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["streamflow_workflows.id"],
            name=op.f("fk_streamflow_cancel_requests_workflow_id_streamflow_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streamflow_cancel_requests")),
    )
    op.create_index(
        op.f("ix_streamflow_cancel_requests_workflow_id_id"),
        "streamflow_cancel_requests",
        ["workflow_id", "id"],
        unique=False,
    )
    op.create_table(
        "streamflow_steps",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
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
        sa.Column("needs_review", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("terminal_cause", sa.String(length=40), nullable=True),
        sa.Column("cancelled_by_step", sa.String(length=200), nullable=True),
        sa.Column("cancel_root_step", sa.String(length=200), nullable=True),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending','available','executing','retryable','completed','failed','cancelled')",
            name=op.f("ck_streamflow_steps_state"),
        ),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_streamflow_steps_max_attempts")),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["streamflow_workflows.id"],
            name=op.f("fk_streamflow_steps_workflow_id_streamflow_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "name", name=op.f("pk_streamflow_steps")),
    )
    op.create_table(
        "streamflow_attempts",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('completed','retryable','failed','cancelled')",
            name=op.f("ck_streamflow_attempts_status"),
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id", "step"],
            ["streamflow_steps.workflow_id", "streamflow_steps.name"],
            name=op.f("fk_streamflow_attempts_workflow_id_step_streamflow_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workflow_id", "step", "attempt", name=op.f("pk_streamflow_attempts")
        ),
    )
    op.create_table(
        "streamflow_edges",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("child", sa.String(length=200), nullable=False),
        sa.Column("parent", sa.String(length=200), nullable=False),
        sa.Column("policy", sa.String(length=16), nullable=False),
        sa.CheckConstraint(
            "policy IN ('cancel','continue')", name=op.f("ck_streamflow_edges_policy")
        ),
        sa.CheckConstraint("child <> parent", name=op.f("ck_streamflow_edges_no_self_loop")),
        sa.ForeignKeyConstraint(
            ["workflow_id", "child"],
            ["streamflow_steps.workflow_id", "streamflow_steps.name"],
            name=op.f("fk_streamflow_edges_workflow_id_child_streamflow_steps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id", "parent"],
            ["streamflow_steps.workflow_id", "streamflow_steps.name"],
            name=op.f("fk_streamflow_edges_workflow_id_parent_streamflow_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "child", "parent", name=op.f("pk_streamflow_edges")),
    )
    op.create_index(
        op.f("ix_streamflow_edges_workflow_id_parent"),
        "streamflow_edges",
        ["workflow_id", "parent"],
        unique=False,
    )
    op.create_table(
        "streamflow_results",
        sa.Column("workflow_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id", "step"],
            ["streamflow_steps.workflow_id", "streamflow_steps.name"],
            name=op.f("fk_streamflow_results_workflow_id_step_streamflow_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workflow_id", "step", name=op.f("pk_streamflow_results")),
    )


def downgrade() -> None:

    op.drop_table("streamflow_results")
    op.drop_index(op.f("ix_streamflow_edges_workflow_id_parent"), table_name="streamflow_edges")
    op.drop_table("streamflow_edges")
    op.drop_table("streamflow_attempts")
    op.drop_table("streamflow_steps")
    op.drop_index(
        op.f("ix_streamflow_cancel_requests_workflow_id_id"),
        table_name="streamflow_cancel_requests",
    )
    op.drop_table("streamflow_cancel_requests")
    op.drop_index(
        op.f("ix_streamflow_workflows_state_created_at"), table_name="streamflow_workflows"
    )
    op.drop_index(
        op.f("ix_streamflow_workflows_name_created_at"), table_name="streamflow_workflows"
    )
    op.drop_table("streamflow_workflows")
    op.drop_index(
        op.f("ix_streamflow_recoveries_workflow_id_id"), table_name="streamflow_recoveries"
    )
    op.drop_index(op.f("ix_streamflow_recoveries_pass_id"), table_name="streamflow_recoveries")
    op.drop_table("streamflow_recoveries")
    op.drop_table("streamflow_reconciler_passes")
    op.drop_index(op.f("ix_streamflow_evidence_workflow_id_id"), table_name="streamflow_evidence")
    op.drop_table("streamflow_evidence")
