"""The ledger's tables (SQLAlchemy Core). Alembic migrations create them.

Every table that grows with the number of workflows is keyed by `workflow_id` first, so
hot queries are served by a primary-key prefix and the tables can later be partitioned
by workflow id. Facts that must hold at most once are unique keys, not locks: one
stored result per step, one attempt row per attempt number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    bindparam,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: JSONB on PostgreSQL (compact, comparable), JSON text elsewhere.
JSONValue = JSON().with_variant(JSONB(), "postgresql")
#: Auto-increment ids: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

STEP_NAME = 200
WORKFLOW_ID = 32


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the backend keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite keeps text without an offset; store UTC wall time there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def in_state(column: ColumnElement[str], state: str) -> ColumnElement[bool]:
    """`column = 'state'` with the state written into the SQL text, not bound.

    A partial index (`WHERE state = 'available'`) serves only a statement whose own
    condition implies the index's, and once psycopg has prepared a statement (its fifth
    execution on a connection) the server may run a generic plan, which knows no
    parameter's value: with the state bound, every sweep read the whole table.
    `tests/integration/test_query_plans.py` checks the generic plans.
    """
    return column == _state_literal(column, state)


def in_states(column: ColumnElement[str], states: Sequence[str]) -> ColumnElement[bool]:
    """`column IN ('a', 'b')`, the states written into the SQL text: see `in_state`."""
    return column.in_([_state_literal(column, state) for state in states])


def unnested(*columns: tuple[str, str, TypeEngine[Any]]) -> TableValuedAlias:
    """A batch's keys as a table: `unnest(:param, ...) AS (name, ...)`, one bound array
    per `(name, param, type)`. Joined to a table by primary key (LATERAL, or an UPDATE's
    FROM), each key is one index lookup whatever the statistics say, and one statement
    text serves every batch size, where a list of keys was planned afresh for each."""
    arrays = (bindparam(param, type_=ARRAY(type_)) for _, param, type_ in columns)
    names = (name for name, _, _ in columns)
    return func.unnest(*arrays).table_valued(*names).render_derived()


def _state_literal(column: ColumnElement[str], state: str) -> ColumnElement[str]:
    if not re.fullmatch(r"[a-z_]+", state):
        raise ValueError(f"not a state name: {state!r}")
    return literal_column(f"'{state}'", column.type)


def _partial_index(name: str, *columns: str, where: str, unique: bool = False) -> Index:
    """An index over the rows matching `where`, on PostgreSQL and SQLite alike."""
    return Index(
        name, *columns, unique=unique, postgresql_where=text(where), sqlite_where=text(where)
    )


def _counter(name: str) -> Column[int]:
    return Column(name, Integer, nullable=False, server_default=text("0"))


STEP_STATES = "'pending','available','executing','retryable','completed','failed','cancelled'"

workflows = Table(
    "streamflow_workflows",
    metadata,
    Column("id", String(WORKFLOW_ID), primary_key=True),
    Column("name", String(200), nullable=False),
    #: running | finished
    Column("state", String(16), nullable=False),
    #: None until finished, then completed | failed | cancelled
    Column("outcome", String(16)),
    Column("semantics_version", SmallInteger, nullable=False),
    Column("context", JSONValue, nullable=False),
    Column("step_count", Integer, nullable=False),
    _counter("pending_count"),
    _counter("available_count"),
    _counter("executing_count"),
    _counter("retryable_count"),
    _counter("completed_count"),
    _counter("failed_count"),
    _counter("cancelled_count"),
    #: Set when any step recorded an ambiguous outcome.
    Column("needs_review", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    #: The `on_finish` callback's job spec (worker, queue, args, max_attempts, priority),
    #: enqueued as a `streamflow_callbacks` row when the workflow records its outcome.
    Column("on_finish", JSONValue),
    CheckConstraint("state IN ('running','finished')", name="state"),
    CheckConstraint(
        "outcome IS NULL OR outcome IN ('completed','failed','cancelled')", name="outcome"
    ),
    Index(None, "state", "created_at"),
    Index(None, "name", "created_at"),
    # `streamflow prune` takes the oldest finished workflows first (ledger.prune).
    _partial_index(
        "ix_streamflow_workflows_finished_at", "finished_at", where="state = 'finished'"
    ),
)

steps = Table(
    "streamflow_steps",
    metadata,
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("name", String(STEP_NAME), primary_key=True),
    #: Order of `add` calls, for stable display.
    Column("position", Integer, nullable=False),
    #: Import path of the Worker class, "package.module:ClassName".
    Column("worker", String(300), nullable=False),
    Column("queue", String(100), nullable=False),
    Column("args", JSONValue, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("state", String(16), nullable=False),
    #: Number of the latest attempt started or recorded (0: never attempted).
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("needs_review", Boolean, nullable=False, server_default=text("false")),
    #: Why a terminal step ended: completed, failed, attempts_exhausted, cancelled,
    #: cancelled_by_dependency, workflow_cancelled, signal_deadline_expired.
    Column("terminal_cause", String(40)),
    #: For cancelled_by_dependency: the dependency whose cancel edge cancelled this step,
    #: and the step whose failure started the cascade.
    Column("cancelled_by_step", String(STEP_NAME)),
    Column("cancel_root_step", String(STEP_NAME)),
    Column("available_at", UTCDateTime),
    #: For retryable steps: when the next attempt is due.
    Column("scheduled_at", UTCDateTime),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", UTCDateTime),
    Column("dispatched_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    ForeignKeyConstraint(["workflow_id"], [workflows.c.id], ondelete="CASCADE"),
    CheckConstraint(f"state IN ({STEP_STATES})", name="state"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    # Partial indexes for the dispatcher and the reconciler: each covers only the steps
    # in one live state, so a sweep costs what it finds, not the size of the ledger.
    _partial_index(
        "ix_streamflow_steps_available_dispatched", "dispatched_at", where="state = 'available'"
    ),
    _partial_index("ix_streamflow_steps_retry_due", "scheduled_at", where="state = 'retryable'"),
    _partial_index(
        "ix_streamflow_steps_lease_expiry", "lease_expires_at", where="state = 'executing'"
    ),
    # The reconciler looks at steps that finished since its last pass. Unfinished steps
    # are left out: an entry for their NULL would be written on every claim and release.
    _partial_index(
        "ix_streamflow_steps_finished_at", "finished_at", where="finished_at IS NOT NULL"
    ),
)

edges = Table(
    "streamflow_edges",
    metadata,
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("child", String(STEP_NAME), primary_key=True),
    Column("parent", String(STEP_NAME), primary_key=True),
    Column("policy", String(16), nullable=False),
    ForeignKeyConstraint(
        ["workflow_id", "child"], [steps.c.workflow_id, steps.c.name], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["workflow_id", "parent"], [steps.c.workflow_id, steps.c.name], ondelete="CASCADE"
    ),
    CheckConstraint("policy IN ('cancel','continue')", name="policy"),
    CheckConstraint("child <> parent", name="no_self_loop"),
    #: Children of a step: the release path's lookup.
    Index(None, "workflow_id", "parent"),
)

results = Table(
    "streamflow_results",
    metadata,
    # One stored result per step: the primary key makes a second one impossible.
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("step", String(STEP_NAME), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("payload", JSONValue),
    Column("recorded_at", UTCDateTime, nullable=False),
    ForeignKeyConstraint(
        ["workflow_id", "step"], [steps.c.workflow_id, steps.c.name], ondelete="CASCADE"
    ),
)

attempts = Table(
    "streamflow_attempts",
    metadata,
    # Every recorded outcome, kept as history: one row per attempt number.
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("step", String(STEP_NAME), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("payload", JSONValue),
    #: attempts_exhausted when a retryable outcome was recorded as failed.
    Column("reason", String(40)),
    Column("source", String(40), nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    ForeignKeyConstraint(
        ["workflow_id", "step"], [steps.c.workflow_id, steps.c.name], ondelete="CASCADE"
    ),
    CheckConstraint("status IN ('completed','retryable','failed','cancelled')", name="status"),
    # The reconciler looks at outcomes recorded since its last pass.
    Index("ix_streamflow_attempts_recorded_at", "recorded_at"),
)

evidence = Table(
    "streamflow_evidence",
    metadata,
    # Every incoming event that did not simply apply: duplicates, late and ambiguous
    # outcomes, and (later issues) signals and stream deliveries. No foreign key: an
    # event may name a workflow that does not exist, and that is evidence too.
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("workflow_id", String(WORKFLOW_ID), nullable=False),
    Column("step", String(STEP_NAME)),
    #: completion | event | delivery | callback (a callback's outcome or delivery)
    Column("kind", String(20), nullable=False),
    #: duplicate | late | ambiguous | consumed | recorded | unmatched | replayed | dropped
    Column("classification", String(20), nullable=False),
    #: Who reported it: api, worker, consumer, reconciler, cli
    Column("source", String(40), nullable=False),
    Column("status", String(16)),
    Column("attempt", Integer),
    Column("payload", JSONValue),
    Column("reason", String(60)),
    #: For completion events: "workflow_id:step:attempt:status" (up to ~250 characters).
    Column("dedupe_key", String(300)),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "workflow_id", "id"),
    # One record accounting for each completion event — consumed by a consumer, or found
    # dropped by the reconciler — so a redelivery is a duplicate and the reconciler never
    # declares an event dropped twice.
    _partial_index(
        "uq_streamflow_evidence_accounted_event",
        "workflow_id",
        "dedupe_key",
        where="kind = 'event' AND classification IN ('consumed', 'dropped')",
        unique=True,
    ),
)

cancel_requests = Table(
    "streamflow_cancel_requests",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("workflow_id", String(WORKFLOW_ID), nullable=False),
    Column("reason", Text),
    Column("requested_by", String(200)),
    Column("created_at", UTCDateTime, nullable=False),
    #: What the request did: applied (it cancelled the workflow), repeated (an earlier
    #: request had already cancelled it) or finished (the workflow had already finished
    #: with another outcome, which stands).
    Column("effect", String(20), nullable=False, server_default=text("'applied'")),
    #: How many steps this request cancelled.
    Column("cancelled_steps", Integer, nullable=False, server_default=text("0")),
    #: The workflow's outcome right after the request.
    Column("workflow_outcome", String(16)),
    ForeignKeyConstraint(["workflow_id"], [workflows.c.id], ondelete="CASCADE"),
    CheckConstraint("effect IN ('applied','repeated','finished')", name="effect"),
    Index(None, "workflow_id", "id"),
)

CALLBACK_STATES = "'available','executing','retryable','completed','failed','cancelled'"

callbacks = Table(
    "streamflow_callbacks",
    metadata,
    # One callback per workflow: the primary key makes a second enqueue impossible.
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("worker", String(300), nullable=False),
    Column("queue", String(100), nullable=False),
    Column("args", JSONValue, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    #: The step states minus pending: available | executing | retryable | completed |
    #: failed | cancelled.
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    #: What the callback reports: the workflow's outcome and counters when it finished.
    Column("workflow_outcome", String(16), nullable=False),
    Column("counters", JSONValue, nullable=False),
    #: The completed callback's result.
    Column("result", JSONValue),
    Column("terminal_cause", String(40)),
    Column("scheduled_at", UTCDateTime),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", UTCDateTime),
    Column("dispatched_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    ForeignKeyConstraint(["workflow_id"], [workflows.c.id], ondelete="CASCADE"),
    CheckConstraint(f"state IN ({CALLBACK_STATES})", name="state"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    _partial_index(
        "ix_streamflow_callbacks_available_dispatched",
        "dispatched_at",
        where="state = 'available'",
    ),
    _partial_index(
        "ix_streamflow_callbacks_retry_due", "scheduled_at", where="state = 'retryable'"
    ),
    _partial_index(
        "ix_streamflow_callbacks_lease_expiry", "lease_expires_at", where="state = 'executing'"
    ),
    # Pruning skips workflows whose callback may still run (ledger.prune).
    _partial_index(
        "ix_streamflow_callbacks_live",
        "workflow_id",
        where="state IN ('available', 'executing', 'retryable')",
    ),
)

callback_attempts = Table(
    "streamflow_callback_attempts",
    metadata,
    # Every delivery of a callback that ran, with its result: one row per attempt.
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("payload", JSONValue),
    Column("reason", String(40)),
    Column("source", String(40), nullable=False),
    #: The worker that ran it.
    Column("lease_owner", String(200)),
    Column("recorded_at", UTCDateTime, nullable=False),
    ForeignKeyConstraint(["workflow_id"], [callbacks.c.workflow_id], ondelete="CASCADE"),
    CheckConstraint("status IN ('completed','retryable','failed','cancelled')", name="status"),
)

AWAIT_STATES = "'pending','waiting','satisfied','expired','cancelled'"

awaits = Table(
    "streamflow_awaits",
    metadata,
    # A step that also waits for an external signal: one row per such step.
    Column("workflow_id", String(WORKFLOW_ID), primary_key=True),
    Column("step", String(STEP_NAME), primary_key=True),
    #: The signal's name; unique within a workflow.
    Column("signal", String(STEP_NAME), nullable=False),
    #: How long the signal may take once the await is active; None: no deadline.
    Column("deadline_ms", BigInteger),
    #: pending (dependencies not all satisfied; the deadline has not started) | waiting
    #: (active: the deadline runs) | satisfied (its signal released the step) | expired
    #: (the deadline passed; the step failed) | cancelled (the step ended otherwise).
    Column("state", String(16), nullable=False),
    #: The signal accepted for it: held while pending, consumed when the step is released.
    Column("signal_id", BigId),
    Column("activated_at", UTCDateTime),
    Column("deadline_at", UTCDateTime),
    Column("resolved_at", UTCDateTime),
    ForeignKeyConstraint(
        ["workflow_id", "step"], [steps.c.workflow_id, steps.c.name], ondelete="CASCADE"
    ),
    CheckConstraint(f"state IN ({AWAIT_STATES})", name="state"),
    Index("uq_streamflow_awaits_signal", "workflow_id", "signal", unique=True),
    # The reconciler's deadline sweep reads only the active awaits.
    _partial_index("ix_streamflow_awaits_deadline", "deadline_at", where="state = 'waiting'"),
)

SIGNAL_CLASSIFICATIONS = "'consumed','recorded','duplicate','ambiguous','late','unmatched'"

signals = Table(
    "streamflow_signals",
    metadata,
    # Every signal received for an existing workflow, with how it was classified.
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("workflow_id", String(WORKFLOW_ID), nullable=False),
    Column("name", String(STEP_NAME), nullable=False),
    #: The step whose await it matched; None when unmatched.
    Column("step", String(STEP_NAME)),
    #: consumed | recorded | duplicate | ambiguous | late | unmatched
    Column("classification", String(20), nullable=False),
    Column("payload", JSONValue),
    Column("dedupe_key", String(300)),
    #: Why, for the ones that did not apply: already_signalled, await_expired, ...
    Column("reason", String(60)),
    #: Who sent it: api, cli, ...
    Column("source", String(40), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    #: For a recorded signal: when its await released the step.
    Column("consumed_at", UTCDateTime),
    ForeignKeyConstraint(["workflow_id"], [workflows.c.id], ondelete="CASCADE"),
    CheckConstraint(f"classification IN ({SIGNAL_CLASSIFICATIONS})", name="classification"),
    Index(None, "workflow_id", "id"),
    # The first signal with a dedupe key stands; repeats are duplicate or ambiguous.
    _partial_index(
        "uq_streamflow_signals_first_of_key",
        "workflow_id",
        "name",
        "dedupe_key",
        where="dedupe_key IS NOT NULL AND classification NOT IN ('duplicate', 'ambiguous')",
        unique=True,
    ),
)

reconciler_passes = Table(
    "streamflow_reconciler_passes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("host", String(200)),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("summary", JSONValue),
)

recoveries = Table(
    "streamflow_recoveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("pass_id", BigId),
    Column("workflow_id", String(WORKFLOW_ID), nullable=False),
    Column("step", String(STEP_NAME)),
    #: What was repaired: release, redispatch, lease_expired, retry_due, ...
    Column("repair", String(40), nullable=False),
    Column("reason", Text, nullable=False),
    Column("evidence", JSONValue),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "workflow_id", "id"),
    Index(None, "pass_id"),
)
