"""Cancelling a workflow: a durable request, every unfinished step cancelled, leases revoked.

One transaction under the workflow lock. The request is always written as a row of its
own — a repeated request, or one for a workflow that already finished, too — and the
workflow's outcome is recorded separately, on the workflow row, by the same
`apply_changes` every transition uses (`ledger.rules.workflow_outcome` with
`cancel_requested=True` gives `cancelled`).

A step a worker is running is cancelled like any other: its lease is cleared and its
attempt recorded as `cancelled` (reason `workflow_cancelled`). The worker finds out when
it next renews the lease (the renewal is refused: the step is no longer executing), and
whatever it reports afterwards is classified `late` (or `duplicate` if it reports
`cancelled`) by the ordinary completion rules and changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select, update

from ledger import tables as t
from ledger.changes import Changes
from ledger.db import lock_workflow
from ledger.model import CancelRequestRecord, CancelResult
from ledger.reads import workflow_row
from ledger.rules import (
    UNFINISHED_STATES,
    CancelEffect,
    StepState,
    cancelled_by_request,
    classify_cancel,
)
from ledger.transitions import apply_changes, set_step_if

#: `terminal_cause` of a step cancelled by a cancel request.
WORKFLOW_CANCELLED = "workflow_cancelled"


def cancel_workflow(
    conn: Connection,
    workflow_id: str,
    *,
    reason: str | None = None,
    requested_by: str | None = None,
    source: str = "api",
    now: datetime | None = None,
) -> CancelResult:
    """Record a cancel request and apply it. Raises WorkflowNotFoundError for an unknown id
    (nothing is written)."""
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"reason must be a string, got {type(reason).__name__}")
    now = now or datetime.now(UTC)
    wf = lock_workflow(conn, workflow_id)
    effect = classify_cancel(wf["outcome"] if wf["state"] == "finished" else None)
    cancelled: list[str] = []
    revoked: list[str] = []
    outcome = wf["outcome"]
    if effect is CancelEffect.APPLIED:
        changes = Changes()
        s = t.steps
        rows = conn.execute(
            select(s.c.name, s.c.state, s.c.attempt, s.c.lease_owner)
            .where(
                s.c.workflow_id == workflow_id,
                s.c.state.in_([st.value for st in UNFINISHED_STATES]),
            )
            .order_by(s.c.position)
        ).all()
        for r in rows:
            state = StepState(r.state)
            if not cancelled_by_request(state):
                continue
            if state is StepState.EXECUTING:
                # The running attempt's fate, on record like any other outcome.
                conn.execute(
                    insert(t.attempts).values(
                        workflow_id=workflow_id,
                        step=r.name,
                        attempt=r.attempt,
                        status="cancelled",
                        payload={"reason": reason, "lease_owner": r.lease_owner},
                        reason=WORKFLOW_CANCELLED,
                        source=source,
                        recorded_at=now,
                    )
                )
            if set_step_if(
                conn,
                workflow_id,
                r.name,
                state,
                {
                    "state": StepState.CANCELLED.value,
                    "terminal_cause": WORKFLOW_CANCELLED,
                    "finished_at": now,
                    "updated_at": now,
                    "scheduled_at": None,
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
            ):
                changes.move(state, StepState.CANCELLED)
                changes.cancelled.append(r.name)
                if state is StepState.EXECUTING:
                    revoked.append(r.name)
        a = t.awaits
        conn.execute(
            update(a)
            .where(a.c.workflow_id == workflow_id, a.c.state.in_(("pending", "waiting")))
            .values(state="cancelled", resolved_at=now)
        )
        outcome = apply_changes(conn, wf, changes, now, cancel_requested=True)
        cancelled = list(changes.cancelled)
    request_id = conn.execute(
        insert(t.cancel_requests)
        .values(
            workflow_id=workflow_id,
            reason=reason,
            requested_by=requested_by or source,
            created_at=now,
            effect=effect.value,
            cancelled_steps=len(cancelled),
            workflow_outcome=outcome,
        )
        .returning(t.cancel_requests.c.id)
    ).scalar_one()
    return CancelResult(
        workflow_id=workflow_id,
        request_id=int(request_id),
        effect=effect.value,
        cancelled=tuple(cancelled),
        revoked=tuple(revoked),
        workflow_outcome=outcome,
    )


def cancel_requests(conn: Connection, workflow_id: str) -> list[CancelRequestRecord]:
    """Every cancel request for the workflow, oldest first."""
    workflow_row(conn, workflow_id)
    c = t.cancel_requests
    return [
        CancelRequestRecord(
            id=r.id,
            reason=r.reason,
            requested_by=r.requested_by,
            effect=r.effect,
            cancelled_steps=r.cancelled_steps,
            workflow_outcome=r.workflow_outcome,
            created_at=r.created_at,
        )
        for r in conn.execute(select(c).where(c.c.workflow_id == workflow_id).order_by(c.c.id))
    ]
