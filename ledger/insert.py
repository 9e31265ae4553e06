"""Writing a new workflow: the workflow row, its steps and edges, in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, insert

from ledger import tables as t
from ledger.ids import new_workflow_id
from ledger.model import WorkflowDefinition
from ledger.rules import SEMANTICS_VERSION, StepState


def insert_workflow(
    conn: Connection, definition: WorkflowDefinition, now: datetime | None = None
) -> str:
    """Insert a validated definition and return the new workflow's id.

    Steps without dependencies start `available`; every other step starts `pending`.
    The caller validates first (the builder does): this writes what it is given.
    """
    now = now or datetime.now(UTC)
    workflow_id = new_workflow_id()
    roots = sum(1 for s in definition.steps if not s.deps)
    conn.execute(
        insert(t.workflows).values(
            id=workflow_id,
            name=definition.name,
            state="running",
            outcome=None,
            semantics_version=SEMANTICS_VERSION,
            context=definition.context,
            step_count=len(definition.steps),
            pending_count=len(definition.steps) - roots,
            available_count=roots,
            needs_review=False,
            created_at=now,
            updated_at=now,
            on_finish=definition.on_finish.to_json() if definition.on_finish else None,
        )
    )
    conn.execute(
        insert(t.steps),
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
                "state": (StepState.PENDING if s.deps else StepState.AVAILABLE).value,
                "attempt": 0,
                "needs_review": False,
                "available_at": None if s.deps else now,
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
        conn.execute(insert(t.edges), edge_rows)
    return workflow_id
