"""Running a workflow's `on_finish` callback: claim, lease, outcome, retries, repairs.

A callback is run by a worker like a step — a ready message on its queue's stream
(`job=callback`), a conditional claim with a lease, `perform`, an outcome — and by the
same rules: `ledger.rules.classify_claim` decides a delivery, `classify_completion` an
outcome (a delivery of a running or finished callback is `duplicate` or `late` evidence
and runs nothing; an outcome for a revoked attempt is `late`). It has no dependencies,
no children and no counters: its state lives on its own row in `streamflow_callbacks`,
and each delivery that ran is a row in `streamflow_callback_attempts` with its result.
Every change takes the workflow lock first, like every step transition.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from ledger import tables as t
from ledger.callbacks import CallbackNotFoundError
from ledger.claims import _DELIVERY_EVIDENCE, Claim, ClaimRefused
from ledger.db import lock_workflow
from ledger.errors import InvalidCompletionError
from ledger.evidence import record_evidence
from ledger.jsonsafe import json_problems
from ledger.model import CALLBACK_JOB, CALLBACK_STEP, CompletionResult, ReadyStep
from ledger.recoveries import record_recovery
from ledger.rules import (
    ClaimVerdict,
    Classification,
    CompletionStatus,
    RecordedAttempt,
    StepSnapshot,
    StepState,
    classify_claim,
    classify_completion,
)
from ledger.transitions import outcome_values, parse_status

_REJECTIONS = {
    "attempt_not_started": "the callback has not started attempt {attempt} (its latest is "
    "{latest})",
}


def _row(conn: Connection, workflow_id: str) -> dict[str, Any]:
    c = t.callbacks
    row = conn.execute(select(c).where(c.c.workflow_id == workflow_id)).mappings().first()
    if row is None:
        raise CallbackNotFoundError(workflow_id)
    return dict(row)


def _set_if(
    conn: Connection, workflow_id: str, expected: StepState, values: dict[str, Any]
) -> bool:
    c = t.callbacks
    return (
        conn.execute(
            update(c)
            .where(c.c.workflow_id == workflow_id, c.c.state == expected.value)
            .values(**values)
        ).rowcount
        == 1
    )


# -- claim, lease, release ----------------------------------------------------------------


def claim_callback(
    conn: Connection,
    workflow_id: str,
    step: str = CALLBACK_STEP,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    source: str = "worker",
) -> Claim | ClaimRefused:
    """Claim the callback for one attempt (`available` -> `executing` with a lease).

    `step` is accepted for symmetry with `claim_step`; a callback is named by its workflow.
    """
    wf = lock_workflow(conn, workflow_id)
    row = _row(conn, workflow_id)
    state = StepState(row["state"])
    verdict = classify_claim(state)
    if verdict is not ClaimVerdict.CLAIM:
        record_evidence(
            conn,
            workflow_id=workflow_id,
            step=CALLBACK_STEP,
            kind="callback",
            classification=_DELIVERY_EVIDENCE[verdict],
            source=source,
            now=now,
            attempt=row["attempt"],
            reason=f"callback_{state.value}",
        )
        return ClaimRefused(workflow_id, CALLBACK_STEP, verdict, state)
    attempt = row["attempt"] + 1
    expires = now + timedelta(seconds=lease_seconds)
    _set_if(
        conn,
        workflow_id,
        StepState.AVAILABLE,
        {
            "state": StepState.EXECUTING.value,
            "attempt": attempt,
            "lease_owner": owner,
            "lease_expires_at": expires,
            "updated_at": now,
        },
    )
    r = t.results
    results = {
        x.step: x.payload
        for x in conn.execute(select(r.c.step, r.c.payload).where(r.c.workflow_id == workflow_id))
    }
    return Claim(
        workflow_id=workflow_id,
        workflow_name=wf["name"],
        step=CALLBACK_STEP,
        attempt=attempt,
        max_attempts=row["max_attempts"],
        worker=row["worker"],
        queue=row["queue"],
        args=row["args"],
        workflow_context=wf["context"],
        dependency_results=results,
        lease_owner=owner,
        lease_expires_at=expires,
        available_at=None,
        job=CALLBACK_JOB,
        workflow_outcome=row["workflow_outcome"],
        counters=dict(row["counters"]),
    )


def renew_callback_lease(
    conn: Connection,
    workflow_id: str,
    step: str = CALLBACK_STEP,
    *,
    owner: str,
    attempt: int,
    lease_seconds: float,
    now: datetime,
) -> bool:
    """Extend a lease this owner still holds; False if it was revoked or the run moved on."""
    c = t.callbacks
    return (
        conn.execute(
            update(c)
            .where(
                c.c.workflow_id == workflow_id,
                c.c.state == StepState.EXECUTING.value,
                c.c.lease_owner == owner,
                c.c.attempt == attempt,
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        ).rowcount
        == 1
    )


def release_callback_claim(
    conn: Connection,
    workflow_id: str,
    step: str = CALLBACK_STEP,
    *,
    owner: str,
    attempt: int,
    now: datetime,
) -> bool:
    """Hand a running callback back (a worker draining): `executing` -> `available`."""
    lock_workflow(conn, workflow_id)
    c = t.callbacks
    return (
        conn.execute(
            update(c)
            .where(
                c.c.workflow_id == workflow_id,
                c.c.state == StepState.EXECUTING.value,
                c.c.lease_owner == owner,
                c.c.attempt == attempt,
            )
            .values(
                state=StepState.AVAILABLE.value,
                lease_owner=None,
                lease_expires_at=None,
                dispatched_at=None,
                updated_at=now,
            )
        ).rowcount
        == 1
    )


# -- outcomes -------------------------------------------------------------------------------


def complete_callback(
    conn: Connection,
    workflow_id: str,
    step: str = CALLBACK_STEP,
    status: str | CompletionStatus = CompletionStatus.COMPLETED,
    payload: Any = None,
    *,
    attempt: int | None = None,
    source: str = "worker",
    now: datetime | None = None,
    retry_at: datetime | None = None,
    dispatch: bool = False,
    reason: str | None = None,
) -> CompletionResult:
    """Record the callback's outcome, by the rules every step outcome follows.

    The signature matches `complete_step` so the worker records either the same way
    (`step` and `dispatch` have nothing to name or release here).
    """
    parsed = parse_status(status)
    problems = json_problems(payload, "payload")
    if problems:
        raise InvalidCompletionError("payload is not plain JSON: " + "; ".join(problems))
    now = now or datetime.now(UTC)
    lock_workflow(conn, workflow_id)
    row = _row(conn, workflow_id)
    state = StepState(row["state"])
    a = t.callback_attempts
    history = {
        r.attempt: RecordedAttempt(r.attempt, CompletionStatus(r.status), r.payload, r.reason)
        for r in conn.execute(
            select(a.c.attempt, a.c.status, a.c.payload, a.c.reason).where(
                a.c.workflow_id == workflow_id
            )
        )
    }
    decision = classify_completion(
        StepSnapshot(state, row["attempt"], row["max_attempts"]), history, parsed, payload, attempt
    )
    if decision.classification is Classification.REJECTED:
        template = _REJECTIONS.get(decision.reason or "", "callback outcome rejected: {reason}")
        raise InvalidCompletionError(
            template.format(attempt=attempt, latest=row["attempt"], reason=decision.reason)
        )
    if decision.classification is not Classification.APPLIED:
        record_evidence(
            conn,
            workflow_id=workflow_id,
            step=CALLBACK_STEP,
            kind="callback",
            classification=decision.classification.value,
            source=source,
            now=now,
            status=parsed.value,
            attempt=attempt,
            payload=payload,
            reason=decision.reason,
        )
        return CompletionResult(
            workflow_id=workflow_id,
            step=CALLBACK_STEP,
            classification=decision.classification,
            status=parsed.value,
            attempt=attempt or row["attempt"],
            reason=decision.reason,
            job=CALLBACK_JOB,
        )
    recorded = decision.status
    conn.execute(
        insert(a).values(
            workflow_id=workflow_id,
            attempt=decision.record_attempt,
            status=recorded.value,
            payload=payload,
            reason=decision.reason or reason,
            source=source,
            lease_owner=row["lease_owner"],
            recorded_at=now,
        )
    )
    values = outcome_values(decision, now, retry_at)
    if recorded is CompletionStatus.COMPLETED:
        values["result"] = payload
    _set_if(conn, workflow_id, state, values)
    return CompletionResult(
        workflow_id=workflow_id,
        step=CALLBACK_STEP,
        classification=Classification.APPLIED,
        status=recorded.value,
        attempt=decision.record_attempt,
        reason=decision.reason,
        job=CALLBACK_JOB,
    )


# -- sweeps: dispatch, stale dispatch, expired leases, streams lost ------------------------


# Run on every dispatcher pass: built once.
_cb = t.callbacks
_PROMOTE_DUE_CALLBACKS = (
    update(_cb)
    .where(
        t.in_state(_cb.c.state, StepState.RETRYABLE.value),
        _cb.c.scheduled_at <= bindparam("b_now"),
    )
    .values(
        state=StepState.AVAILABLE.value,
        scheduled_at=None,
        dispatched_at=None,
        updated_at=bindparam("b_now"),
    )
)
_UNDISPATCHED_CALLBACKS = (
    select(_cb.c.workflow_id, _cb.c.queue, _cb.c.priority)
    .where(t.in_state(_cb.c.state, StepState.AVAILABLE.value), _cb.c.dispatched_at.is_(None))
    .order_by(_cb.c.priority.desc(), _cb.c.updated_at)
    .limit(bindparam("b_limit"))
)


def dispatch_callbacks(
    conn: Connection, now: datetime, limit: int = 500, *, promote: bool = True
) -> tuple[ReadyStep, ...]:
    """Callbacks due for a retry go back to `available` (unless `promote` is off); every
    available, undispatched callback is marked dispatched and returned for publishing
    (conditionally, so of two dispatchers exactly one publishes it)."""
    c = t.callbacks
    if limit <= 0:
        return ()
    if promote:
        conn.execute(_PROMOTE_DUE_CALLBACKS, {"b_now": now})
    rows = conn.execute(_UNDISPATCHED_CALLBACKS, {"b_limit": limit}).all()
    out = []
    for r in rows:
        marked = conn.execute(
            update(c)
            .where(
                c.c.workflow_id == r.workflow_id,
                c.c.state == StepState.AVAILABLE.value,
                c.c.dispatched_at.is_(None),
            )
            .values(dispatched_at=now)
        ).rowcount
        if marked == 1:
            out.append(ReadyStep(r.workflow_id, CALLBACK_STEP, r.queue, r.priority, CALLBACK_JOB))
    return tuple(out)


def redispatch_stale_callbacks(
    conn: Connection,
    now: datetime,
    older_than: timedelta,
    limit: int = 500,
    pass_id: int | None = None,
) -> tuple[ReadyStep, ...]:
    """Available callbacks dispatched long ago and never claimed: their ready message was
    lost. Dispatch them again, with a recovery row."""
    c = t.callbacks
    rows = conn.execute(
        select(c.c.workflow_id, c.c.queue, c.c.priority, c.c.dispatched_at)
        .where(
            t.in_state(c.c.state, StepState.AVAILABLE.value),
            c.c.dispatched_at < now - older_than,
        )
        .order_by(c.c.dispatched_at)
        .limit(limit)
    ).all()
    out = []
    for r in rows:
        changed = conn.execute(
            update(c)
            .where(
                c.c.workflow_id == r.workflow_id,
                c.c.state == StepState.AVAILABLE.value,
                c.c.dispatched_at == r.dispatched_at,
            )
            .values(dispatched_at=now)
        ).rowcount
        if changed == 1:
            record_recovery(
                conn,
                workflow_id=r.workflow_id,
                step=CALLBACK_STEP,
                repair="redispatch",
                reason=f"callback available and unclaimed since its dispatch at "
                f"{r.dispatched_at.isoformat()}: the ready message was lost",
                now=now,
                evidence={"dispatched_at": r.dispatched_at.isoformat(), "job": CALLBACK_JOB},
                pass_id=pass_id,
            )
            out.append(ReadyStep(r.workflow_id, CALLBACK_STEP, r.queue, r.priority, CALLBACK_JOB))
    return tuple(out)


def expire_callback_leases(
    conn: Connection, now: datetime, limit: int = 500, pass_id: int | None = None
) -> list[CompletionResult]:
    """Running callbacks whose lease ran out (the worker died or hung): the attempt is
    recorded `retryable` (reason lease_expired, due at once), or `failed` on the last."""
    c = t.callbacks
    rows = conn.execute(
        select(c.c.workflow_id, c.c.attempt)
        .where(t.in_state(c.c.state, StepState.EXECUTING.value), c.c.lease_expires_at < now)
        .order_by(c.c.workflow_id)
        .limit(limit)
    ).all()
    results = []
    for r in rows:
        lock_workflow(conn, r.workflow_id)
        still = conn.execute(
            select(c.c.lease_owner, c.c.lease_expires_at).where(
                c.c.workflow_id == r.workflow_id,
                c.c.state == StepState.EXECUTING.value,
                c.c.attempt == r.attempt,
                c.c.lease_expires_at < now,
            )
        ).first()
        if still is None:
            continue
        result = complete_callback(
            conn,
            r.workflow_id,
            CALLBACK_STEP,
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
            step=CALLBACK_STEP,
            repair="callback_lease_expired",
            reason=f"lease of {still.lease_owner!r} on callback attempt {r.attempt} expired at "
            f"{still.lease_expires_at.isoformat()}; recorded as {result.status}",
            now=now,
            evidence={"lease_owner": still.lease_owner, "attempt": r.attempt},
            pass_id=pass_id,
        )
        results.append(result)
    return results


def undispatch_all_callbacks(conn: Connection) -> list[ReadyStep]:
    """After Redis lost its data: every dispatched, available callback is sent again."""
    c = t.callbacks
    rows = conn.execute(
        update(c)
        .where(t.in_state(c.c.state, StepState.AVAILABLE.value), c.c.dispatched_at.is_not(None))
        .values(dispatched_at=None)
        .returning(c.c.workflow_id, c.c.queue, c.c.priority)
    ).all()
    return [
        ReadyStep(r.workflow_id, CALLBACK_STEP, r.queue, r.priority, CALLBACK_JOB) for r in rows
    ]


def callback_state(conn: Connection, workflow_id: str) -> str | None:
    c = t.callbacks
    return conn.execute(select(c.c.state).where(c.c.workflow_id == workflow_id)).scalar()
