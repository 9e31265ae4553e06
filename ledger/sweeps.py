"""Sweeps over the ledger that keep work moving when messages go missing.

Each query reads one partial index (see `ledger.tables`), so a sweep costs in
proportion to what it finds. Every state change re-checks its condition under the
workflow lock, so sweeps are safe to run while workers, consumers and other sweepers
(another host's reconciler) run at the same time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, select

from ledger import tables as t
from ledger.callback_jobs import dispatch_callbacks, redispatch_stale_callbacks
from ledger.changes import Changes
from ledger.db import lock_workflow
from ledger.model import CompletionResult, ReadyStep
from ledger.recoveries import record_recovery
from ledger.rules import StepState
from ledger.transitions import apply_changes, complete_step, mark_dispatched, set_step_if

# The dispatcher runs these on every pass (ten a second when idle): built once.
_s = t.steps
_UNDISPATCHED = (
    select(_s.c.workflow_id, _s.c.name, _s.c.queue, _s.c.priority)
    .where(t.in_state(_s.c.state, StepState.AVAILABLE.value), _s.c.dispatched_at.is_(None))
    .order_by(_s.c.priority.desc(), _s.c.available_at)
    .limit(bindparam("b_limit"))
)
_DUE_RETRIES = (
    select(_s.c.workflow_id, _s.c.name, _s.c.queue, _s.c.priority, _s.c.scheduled_at)
    .where(
        t.in_state(_s.c.state, StepState.RETRYABLE.value), _s.c.scheduled_at <= bindparam("b_due")
    )
    .order_by(_s.c.workflow_id, _s.c.name)
    .limit(bindparam("b_limit"))
)


def dispatch_undispatched(
    conn: Connection, now: datetime, limit: int = 500, *, promote: bool = True
) -> tuple[ReadyStep, ...]:
    """Available steps nobody dispatched yet (inserted roots, API completions, retries):
    mark them dispatched and return them for publishing, highest priority first; then
    the `on_finish` callbacks waiting to be sent, within the same `limit`. `promote`:
    first move callbacks due for a retry back to `available` (the dispatcher does so once
    per poll interval, as it does for steps' retries, not on every pass)."""
    rows = conn.execute(_UNDISPATCHED, {"b_limit": limit}).all()
    candidates = [ReadyStep(r.workflow_id, r.name, r.queue, r.priority) for r in rows]
    steps = mark_dispatched(conn, candidates, now)
    # Then `on_finish` callbacks enqueued (or due for a retry) and not yet dispatched.
    return steps + dispatch_callbacks(conn, now, limit - len(steps), promote=promote)


def redispatch_stale(
    conn: Connection,
    now: datetime,
    older_than: timedelta,
    limit: int = 500,
    pass_id: int | None = None,
) -> tuple[ReadyStep, ...]:
    """Available steps dispatched long ago and still unclaimed: the ready message was
    lost (dropped, trimmed, Redis flushed). Dispatch them again, with a recovery row."""
    s = t.steps
    cutoff = now - older_than
    rows = conn.execute(
        select(s.c.workflow_id, s.c.name, s.c.queue, s.c.priority, s.c.dispatched_at)
        .where(t.in_state(s.c.state, StepState.AVAILABLE.value), s.c.dispatched_at < cutoff)
        .order_by(s.c.dispatched_at)
        .limit(limit)
    ).all()
    out = []
    for r in rows:
        changed = conn.execute(
            s.update()
            .where(
                s.c.workflow_id == r.workflow_id,
                s.c.name == r.name,
                s.c.state == StepState.AVAILABLE.value,
                s.c.dispatched_at == r.dispatched_at,
            )
            .values(dispatched_at=now)
        ).rowcount
        if changed == 1:
            record_recovery(
                conn,
                workflow_id=r.workflow_id,
                step=r.name,
                repair="redispatch",
                reason=f"available and unclaimed since its dispatch at "
                f"{r.dispatched_at.isoformat()}: the ready message was lost",
                now=now,
                evidence={"dispatched_at": r.dispatched_at.isoformat()},
                pass_id=pass_id,
            )
            out.append(ReadyStep(r.workflow_id, r.name, r.queue, r.priority))
    callbacks = redispatch_stale_callbacks(conn, now, older_than, limit - len(out), pass_id)
    return tuple(out) + callbacks


def promote_due_retries(
    conn: Connection,
    now: datetime,
    limit: int = 500,
    pass_id: int | None = None,
    overdue: timedelta | None = None,
) -> list[ReadyStep]:
    """`retryable` steps whose retry time has come go back to `available` (undispatched).

    With `overdue` (the reconciler's use) only retries due for at least that long are
    taken — the ones the dispatcher missed — and each gets a recovery row.
    """
    due = now - (overdue or timedelta(0))
    rows = conn.execute(_DUE_RETRIES, {"b_due": due, "b_limit": limit}).all()
    promoted = []
    for workflow_id in dict.fromkeys(r.workflow_id for r in rows):
        wf = lock_workflow(conn, workflow_id)
        changes = Changes()
        for r in (r for r in rows if r.workflow_id == workflow_id):
            if set_step_if(
                conn,
                workflow_id,
                r.name,
                StepState.RETRYABLE,
                {
                    "state": StepState.AVAILABLE.value,
                    "available_at": now,
                    "dispatched_at": None,
                    "scheduled_at": None,
                    "updated_at": now,
                },
            ):
                changes.move(StepState.RETRYABLE, StepState.AVAILABLE)
                promoted.append(ReadyStep(workflow_id, r.name, r.queue, r.priority))
                if overdue is not None:
                    record_recovery(
                        conn,
                        workflow_id=workflow_id,
                        step=r.name,
                        repair="retry_due",
                        reason=f"retry due at {r.scheduled_at.isoformat()} was not taken up",
                        now=now,
                        pass_id=pass_id,
                        evidence={"scheduled_at": r.scheduled_at.isoformat()},
                    )
        apply_changes(conn, wf, changes, now)
    return promoted


def expire_leases(
    conn: Connection, now: datetime, limit: int = 500, pass_id: int | None = None
) -> list[CompletionResult]:
    """Executing steps whose lease ran out (the worker died or hung): the attempt is
    recorded as `retryable` with reason lease_expired and a retry due now — or as
    `failed` when it was the last attempt, by the same rule as any other outcome."""
    s = t.steps
    rows = conn.execute(
        select(s.c.workflow_id, s.c.name, s.c.attempt)
        .where(t.in_state(s.c.state, StepState.EXECUTING.value), s.c.lease_expires_at < now)
        .order_by(s.c.workflow_id, s.c.name)
        .limit(limit)
    ).all()
    results = []
    for r in rows:
        lock_workflow(conn, r.workflow_id)
        # Re-check under the lock: the worker may have finished, or renewed, meanwhile.
        still = conn.execute(
            select(s.c.lease_owner, s.c.lease_expires_at).where(
                s.c.workflow_id == r.workflow_id,
                s.c.name == r.name,
                s.c.state == StepState.EXECUTING.value,
                s.c.attempt == r.attempt,
                s.c.lease_expires_at < now,
            )
        ).first()
        if still is None:
            continue
        result = complete_step(
            conn,
            r.workflow_id,
            r.name,
            "retryable",
            {"error": "lease expired", "lease_owner": still.lease_owner},
            attempt=r.attempt,
            source="reconciler",
            now=now,
            retry_at=now,
            reason="lease_expired",
        )
        record_recovery(
            conn,
            workflow_id=r.workflow_id,
            step=r.name,
            repair="lease_expired",
            reason=f"lease of {still.lease_owner!r} on attempt {r.attempt} expired at "
            f"{still.lease_expires_at.isoformat()}; recorded as {result.status}",
            now=now,
            evidence={"lease_owner": still.lease_owner, "attempt": r.attempt},
            pass_id=pass_id,
        )
        results.append(result)
    return results
