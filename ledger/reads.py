"""Reading workflows, steps and results back."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from ledger import tables as t
from ledger.errors import WorkflowNotFoundError
from ledger.model import Counters, StepRecord, WorkflowRecord
from ledger.rules import EdgePolicy, StepState


def workflow_row(conn: Connection, workflow_id: str) -> dict[str, Any]:
    row = (
        conn.execute(select(t.workflows).where(t.workflows.c.id == workflow_id)).mappings().first()
    )
    if row is None:
        raise WorkflowNotFoundError(workflow_id)
    return dict(row)


def counters_of(row: dict[str, Any]) -> Counters:
    return Counters(
        pending=row["pending_count"],
        runnable=row["available_count"],
        executing=row["executing_count"],
        retryable=row["retryable_count"],
        completed=row["completed_count"],
        failed=row["failed_count"],
        cancelled=row["cancelled_count"],
    )


def get_workflow(conn: Connection, workflow_id: str) -> WorkflowRecord:
    w = workflow_row(conn, workflow_id)
    deps: dict[str, list[tuple[str, EdgePolicy]]] = {}
    e_, p = t.edges, t.steps
    # Dependencies in the order their steps were added, as everywhere else.
    for e in conn.execute(
        select(e_.c.child, e_.c.parent, e_.c.policy)
        .join(p, (p.c.workflow_id == e_.c.workflow_id) & (p.c.name == e_.c.parent))
        .where(e_.c.workflow_id == workflow_id)
        .order_by(p.c.position)
    ):
        deps.setdefault(e.child, []).append((e.parent, EdgePolicy(e.policy)))
    a = t.awaits
    awaits = {
        r.step: r
        for r in conn.execute(
            select(a.c.step, a.c.signal, a.c.state, a.c.signal_id, a.c.deadline_at).where(
                a.c.workflow_id == workflow_id
            )
        )
    }
    steps: dict[str, StepRecord] = {}
    for s in conn.execute(
        select(t.steps).where(t.steps.c.workflow_id == workflow_id).order_by(t.steps.c.position)
    ).mappings():
        steps[s["name"]] = StepRecord(
            name=s["name"],
            state=StepState(s["state"]),
            attempt=s["attempt"],
            max_attempts=s["max_attempts"],
            worker=s["worker"],
            queue=s["queue"],
            priority=s["priority"],
            args=s["args"],
            needs_review=s["needs_review"],
            terminal_cause=s["terminal_cause"],
            cancelled_by_step=s["cancelled_by_step"],
            cancel_root_step=s["cancel_root_step"],
            scheduled_at=s["scheduled_at"],
            finished_at=s["finished_at"],
            deps=tuple(deps.get(s["name"], [])),
            **_await_fields(awaits.get(s["name"])),
        )
    return WorkflowRecord(
        id=w["id"],
        name=w["name"],
        state=w["state"],
        outcome=w["outcome"],
        semantics_version=w["semantics_version"],
        context=w["context"],
        counters=counters_of(w),
        needs_review=w["needs_review"],
        created_at=w["created_at"],
        finished_at=w["finished_at"],
        steps=steps,
    )


def _await_fields(row: Any) -> dict[str, Any]:
    if row is None:
        return {}
    return {
        "await_signal": row.signal,
        "await_state": row.state,
        "signal_received": row.signal_id is not None,
        "signal_deadline_at": row.deadline_at,
    }


def get_results(conn: Connection, workflow_id: str) -> dict[str, Any]:
    """`{step: stored payload}` for every completed step."""
    workflow_row(conn, workflow_id)
    r = t.results
    return {
        row.step: row.payload
        for row in conn.execute(select(r.c.step, r.c.payload).where(r.c.workflow_id == workflow_id))
    }
