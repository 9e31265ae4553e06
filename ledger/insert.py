"""Writing a new workflow: the workflow row, its steps and edges, in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, insert

from ledger import tables as t
from ledger.db import notify_dispatcher
from ledger.ids import new_workflow_id
from ledger.model import StepDefinition, WorkflowDefinition
from ledger.rules import SEMANTICS_VERSION, AwaitState, StepState, await_deadline

# Built once: an application inserting many workflows pays only for the parameters.
_INSERT_WORKFLOW = insert(t.workflows)
_INSERT_STEPS = insert(t.steps)
_INSERT_EDGES = insert(t.edges)


def insert_workflow(
    conn: Connection, definition: WorkflowDefinition, now: datetime | None = None
) -> str:
    """Insert a validated definition and return the new workflow's id.

    Steps without dependencies start `available`; every other step starts `pending`, and
    so does a root step that awaits a signal (its await is active from now).
    The caller validates first (the builder does): this writes what it is given.
    """
    now = now or datetime.now(UTC)
    workflow_id = new_workflow_id()
    # A root step awaiting a signal starts pending, its await already active.
    roots = sum(1 for s in definition.steps if not s.deps and s.await_signal is None)
    conn.execute(
        _INSERT_WORKFLOW,
        {
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
        },
    )
    if roots:
        notify_dispatcher(conn)
    conn.execute(
        _INSERT_STEPS,
        [
            {
                "workflow_id": workflow_id,
                "name": s.name,
                "position": i,
                "worker": s.worker,
                "queue": s.queue,
                "args": s.args,
                "max_attempts": s.max_attempts,
                "priority": s.priority,
                "state": (StepState.PENDING if _starts_pending(s) else StepState.AVAILABLE).value,
                "attempt": 0,
                "needs_review": False,
                "available_at": None if _starts_pending(s) else now,
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


def _starts_pending(step: StepDefinition) -> bool:
    return bool(step.deps) or step.await_signal is not None
