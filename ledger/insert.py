"""Writing a new workflow: the workflow row, its steps and edges, in one transaction
(on PostgreSQL, in one statement)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Boolean, Connection, bindparam, insert, text

from ledger import tables as t
from ledger.db import DISPATCH_CHANNEL, notify_dispatcher
from ledger.ids import new_workflow_id
from ledger.model import ReadyStep, StepDefinition, WorkflowDefinition
from ledger.rules import SEMANTICS_VERSION, AwaitState, StepState, await_deadline

# Built once: an application inserting many workflows pays only for the parameters.
_INSERT_WORKFLOW = insert(t.workflows)
_INSERT_STEPS = insert(t.steps)
_INSERT_EDGES = insert(t.edges)


def insert_workflow(
    conn: Connection,
    definition: WorkflowDefinition,
    now: datetime | None = None,
    *,
    dispatch: bool = False,
) -> str:
    """Insert a validated definition and return the new workflow's id.

    Steps without dependencies start `available`; every other step starts `pending`, and
    so does a root step that awaits a signal (its await is active from now).
    The caller validates first (the builder does): this writes what it is given.
    On PostgreSQL the workflow, its steps, its edges and the dispatcher's wake-up are one
    statement; elsewhere one statement per table.

    `dispatch`: the caller publishes the available roots itself once this commits
    (`runnable_roots` lists them), so they are written dispatched and the dispatcher is
    not woken. If that publish fails, `ledger.transitions.unmark_dispatched` hands them
    back to the dispatcher.
    """
    now = now or datetime.now(UTC)
    if conn.dialect.name == "postgresql":
        workflow_id = _insert_at_once(conn, definition, now, dispatch)
    else:
        workflow_id = insert_rows_one_table_at_a_time(conn, definition, now, dispatch)
    await_rows = [
        {
            "workflow_id": workflow_id,
            "step": s.name,
            "signal": s.await_signal,
            "deadline_ms": s.signal_deadline_ms,
            # Active at once for a root; a child's activates when its dependencies are.
            "state": (AwaitState.PENDING if s.deps else AwaitState.WAITING).value,
            "activated_at": None if s.deps else now,
            "deadline_at": None if s.deps else await_deadline(now, s.signal_deadline_ms),
        }
        for s in definition.steps
        if s.await_signal is not None
    ]
    if await_rows:
        conn.execute(insert(t.awaits), await_rows)
    return workflow_id


def _runnable_root_count(definition: WorkflowDefinition) -> int:
    # A root step awaiting a signal starts pending, its await already active.
    return sum(1 for s in definition.steps if not _starts_pending(s))


def runnable_roots(workflow_id: str, definition: WorkflowDefinition) -> tuple[ReadyStep, ...]:
    """The steps a new workflow starts `available`, to publish: its roots that await no
    signal, in definition order."""
    return tuple(
        ReadyStep(workflow_id, s.name, s.queue, s.priority)
        for s in definition.steps
        if not _starts_pending(s)
    )


def _workflow_row(
    workflow_id: str, definition: WorkflowDefinition, now: datetime
) -> dict[str, Any]:
    roots = _runnable_root_count(definition)
    return {
        "id": workflow_id,
        "name": definition.name,
        "state": "running",
        "outcome": None,
        "semantics_version": SEMANTICS_VERSION,
        "context": definition.context,
        "step_count": len(definition.steps),
        "pending_count": len(definition.steps) - roots,
        "available_count": roots,
        "needs_review": False,
        "created_at": now,
        "updated_at": now,
        "on_finish": definition.on_finish.to_json() if definition.on_finish else None,
    }


def insert_rows_one_table_at_a_time(
    conn: Connection, definition: WorkflowDefinition, now: datetime, dispatch: bool = False
) -> str:
    """The workflow row, then its steps, then its edges: SQLite's way (and the reference
    the PostgreSQL statement is tested against)."""
    workflow_id = new_workflow_id()
    conn.execute(_INSERT_WORKFLOW, _workflow_row(workflow_id, definition, now))
    if _runnable_root_count(definition) and not dispatch:
        notify_dispatcher(conn)
    conn.execute(
        _INSERT_STEPS,
        [
            {
                "workflow_id": workflow_id,
                **_step_fields(i, s),
                "state": (StepState.PENDING if _starts_pending(s) else StepState.AVAILABLE).value,
                "attempt": 0,
                "needs_review": False,
                "available_at": None if _starts_pending(s) else now,
                "dispatched_at": now if dispatch and not _starts_pending(s) else None,
                "created_at": now,
                "updated_at": now,
            }
            for i, s in enumerate(definition.steps)
        ],
    )
    edge_rows = [
        {"workflow_id": workflow_id, "child": s.name, "parent": parent, "policy": policy.value}
        for s in definition.steps
        for parent, policy in s.deps
    ]
    if edge_rows:
        conn.execute(_INSERT_EDGES, edge_rows)
    return workflow_id


def _insert_at_once(
    conn: Connection, definition: WorkflowDefinition, now: datetime, dispatch: bool
) -> str:
    """PostgreSQL: every row in one statement — the steps and edges travel as one JSON
    array each — so a submission is one round trip before its commit, not four."""
    workflow_id = new_workflow_id()
    params = {f"bw_{k}": v for k, v in _workflow_row(workflow_id, definition, now).items()}
    params["b_notify"] = _runnable_root_count(definition) > 0 and not dispatch
    params["b_dispatched"] = dispatch
    params["b_steps"] = json.dumps(
        [
            {**_step_fields(i, s), "pending": _starts_pending(s)}
            for i, s in enumerate(definition.steps)
        ]
    )
    params["b_edges"] = json.dumps(
        [
            {"child": s.name, "parent": parent, "policy": policy.value}
            for s in definition.steps
            for parent, policy in s.deps
        ]
    )
    conn.execute(_INSERT_AT_ONCE, params)
    return workflow_id


_w, _s, _e = t.workflows.name, t.steps.name, t.edges.name
_WORKFLOW_COLUMNS = (
    "id",
    "name",
    "state",
    "outcome",
    "semantics_version",
    "context",
    "step_count",
    "pending_count",
    "available_count",
    "needs_review",
    "created_at",
    "updated_at",
    "on_finish",
)
# The steps and edges arrive as JSON arrays, unpacked by jsonb_to_recordset; the
# dispatcher's NOTIFY is the statement's select (delivered at commit, like any NOTIFY).
# Every data-modifying CTE runs to completion whether or not anything reads it, and the
# foreign keys are checked at the end of the statement, when the workflow row is there.
_INSERT_AT_ONCE = text(
    f"WITH new_workflow AS (INSERT INTO {_w} ({', '.join(_WORKFLOW_COLUMNS)}) "
    f"VALUES ({', '.join(':bw_' + c for c in _WORKFLOW_COLUMNS)})), "
    f"new_steps AS (INSERT INTO {_s} (workflow_id, name, position, worker, queue, args, "
    "max_attempts, priority, state, attempt, needs_review, available_at, dispatched_at, "
    "created_at, updated_at) "
    "SELECT :bw_id, x.name, x.position, x.worker, x.queue, x.args, x.max_attempts, "
    "x.priority, CASE WHEN x.pending THEN 'pending' ELSE 'available' END, 0, false, "
    "CASE WHEN x.pending THEN NULL ELSE :bw_created_at END, "
    "CASE WHEN x.pending OR NOT :b_dispatched THEN NULL ELSE :bw_created_at END, "
    ":bw_created_at, :bw_created_at "
    "FROM jsonb_to_recordset(CAST(:b_steps AS jsonb)) AS x(name text, position integer, "
    "worker text, queue text, args jsonb, max_attempts integer, priority integer, "
    "pending boolean)), "
    f"new_edges AS (INSERT INTO {_e} (workflow_id, child, parent, policy) "
    "SELECT :bw_id, e.child, e.parent, e.policy "
    "FROM jsonb_to_recordset(CAST(:b_edges AS jsonb)) AS e(child text, parent text, "
    "policy text)) "
    f"SELECT CASE WHEN :b_notify THEN pg_notify('{DISPATCH_CHANNEL}', '') END"
).bindparams(
    bindparam("bw_context", type_=t.workflows.c.context.type),
    bindparam("bw_on_finish", type_=t.workflows.c.on_finish.type),
    bindparam("bw_created_at", type_=t.workflows.c.created_at.type),
    bindparam("bw_updated_at", type_=t.workflows.c.updated_at.type),
    bindparam("b_notify", type_=Boolean),
    bindparam("b_dispatched", type_=Boolean),
)


def _step_fields(position: int, step: StepDefinition) -> dict[str, Any]:
    """What a step row takes from its definition, whichever way it is written."""
    return {
        "name": step.name,
        "position": position,
        "worker": step.worker,
        "queue": step.queue,
        "args": step.args,
        "max_attempts": step.max_attempts,
        "priority": step.priority,
    }


def _starts_pending(step: StepDefinition) -> bool:
    return bool(step.deps) or step.await_signal is not None
