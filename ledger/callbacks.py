"""A workflow's `on_finish` callback: enqueued exactly once, when the workflow finishes.

`enqueue_callback` runs inside `apply_changes`, in the transaction that records the
workflow's outcome, under the workflow lock: the `streamflow_callbacks` row is written
exactly when the outcome is, or not at all. The table's primary key (one row per
workflow) is the last word — a second enqueue cannot exist. A workflow an operator
reopened and that finishes again does not enqueue it again: that attempt is kept as
`duplicate` callback evidence instead.

Running it (claim, lease, outcome, retries) is `ledger.callback_jobs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from ledger import tables as t
from ledger.errors import LedgerError
from ledger.evidence import record_evidence
from ledger.model import CALLBACK_STEP, CallbackAttemptRecord, CallbackRecord, Counters
from ledger.reads import workflow_row
from ledger.rules import StepState


class CallbackNotFoundError(LedgerError, LookupError):
    def __init__(self, workflow_id: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r} has no on_finish callback enqueued (it has none, or "
            "has not finished yet)"
        )
        self.workflow_id = workflow_id


def counters_dict(counts: Mapping[StepState, int]) -> dict[str, int]:
    """Step counts in the public `Counters` vocabulary (`runnable` for available)."""
    return Counters(
        pending=counts.get(StepState.PENDING, 0),
        runnable=counts.get(StepState.AVAILABLE, 0),
        executing=counts.get(StepState.EXECUTING, 0),
        retryable=counts.get(StepState.RETRYABLE, 0),
        completed=counts.get(StepState.COMPLETED, 0),
        failed=counts.get(StepState.FAILED, 0),
        cancelled=counts.get(StepState.CANCELLED, 0),
    ).as_dict()


def enqueue_callback(
    conn: Connection,
    wf: Mapping[str, Any],
    outcome: str,
    counts: Mapping[StepState, int],
    now: datetime,
) -> bool:
    """Enqueue the workflow's callback, if it has one; True if this call enqueued it.

    Call only from the transaction that records the outcome, holding the workflow lock.
    """
    spec = wf.get("on_finish")
    if not spec:
        return False
    workflow_id = wf["id"]
    c = t.callbacks
    existing = conn.execute(
        select(c.c.state, c.c.workflow_outcome).where(c.c.workflow_id == workflow_id)
    ).first()
    if existing is not None:
        record_evidence(
            conn,
            workflow_id=workflow_id,
            step=CALLBACK_STEP,
            kind="callback",
            classification="duplicate",
            source="ledger",
            now=now,
            status=outcome,
            reason="already_enqueued",
            payload={"first_outcome": existing.workflow_outcome, "state": existing.state},
        )
        return False
    conn.execute(
        insert(c).values(
            workflow_id=workflow_id,
            worker=spec["worker"],
            queue=spec["queue"],
            args=spec["args"],
            max_attempts=spec["max_attempts"],
            priority=spec.get("priority", 0),
            state=StepState.AVAILABLE.value,
            attempt=0,
            workflow_outcome=outcome,
            counters=counters_dict(counts),
            created_at=now,
            updated_at=now,
        )
    )
    return True


def get_callback(conn: Connection, workflow_id: str) -> CallbackRecord | None:
    """The workflow's callback with every delivery, or None if none was enqueued."""
    workflow_row(conn, workflow_id)
    c, a = t.callbacks, t.callback_attempts
    row = conn.execute(select(c).where(c.c.workflow_id == workflow_id)).mappings().first()
    if row is None:
        return None
    attempts = tuple(
        CallbackAttemptRecord(
            attempt=r.attempt,
            status=r.status,
            payload=r.payload,
            reason=r.reason,
            source=r.source,
            lease_owner=r.lease_owner,
            recorded_at=r.recorded_at,
        )
        for r in conn.execute(select(a).where(a.c.workflow_id == workflow_id).order_by(a.c.attempt))
    )
    return CallbackRecord(
        workflow_id=workflow_id,
        worker=row["worker"],
        queue=row["queue"],
        args=row["args"],
        state=row["state"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        workflow_outcome=row["workflow_outcome"],
        counters=row["counters"],
        result=row["result"],
        terminal_cause=row["terminal_cause"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        attempts=attempts,
    )
