"""External signals and the awaits they release.

`record_signal` keeps every signal as a row of `streamflow_signals`, classified by
`ledger.rules.classify_signal` under the workflow lock: `consumed` (its await was active:
the step is released in the same transaction), `recorded` (its await was not active yet:
the signal is held on the await and consumed when the step's dependencies are
satisfied), `duplicate` / `ambiguous` (its dedupe key was seen before, with the same or a
different payload: the first stands; an ambiguous one flags the step for review), `late`
(the await already had its signal, expired, or its step ended) and `unmatched` (no step
of the workflow awaits that name). Like `insert` and `complete_step` it only writes the
ledger: a released step is dispatched by the dispatcher.

`expire_awaits` is the reconciler's: an active await past its deadline fails its step
(`terminal_cause = signal_deadline_expired`), which cascades as any failure, and leaves a
recovery row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ledger import tables as t
from ledger.changes import Changes
from ledger.db import lock_workflow
from ledger.errors import LedgerError
from ledger.jsonsafe import json_problems
from ledger.model import ReadyStep, SignalRecord, SignalResult
from ledger.reads import workflow_row
from ledger.recoveries import record_recovery
from ledger.rules import (
    AwaitState,
    AwaitView,
    PriorSignal,
    SignalClassification,
    StepState,
    await_expired,
    classify_signal,
)
from ledger.transitions import (
    _flag_for_review,
    apply_changes,
    close_await,
    reconcile_descendants,
    set_step_if,
)

#: `terminal_cause` of a step whose signal did not arrive in time.
SIGNAL_DEADLINE_EXPIRED = "signal_deadline_expired"
MAX_SIGNAL_NAME = 200
MAX_DEDUPE_KEY = 300


class InvalidSignalError(LedgerError, ValueError):
    """A signal that cannot be recorded as given; nothing was written."""


def record_signal(
    conn: Connection,
    workflow_id: str,
    name: str,
    payload: Any = None,
    *,
    dedupe_key: str | None = None,
    source: str = "api",
    now: datetime | None = None,
) -> SignalResult:
    """Record a signal for the workflow and apply it. Raises WorkflowNotFoundError for an
    unknown workflow and InvalidSignalError for a bad name, key or payload (nothing is
    written either way)."""
    if not isinstance(name, str) or not name or len(name) > MAX_SIGNAL_NAME:
        raise InvalidSignalError(
            f"signal name must be a non-empty string of at most {MAX_SIGNAL_NAME} "
            f"characters, got {name!r}"
        )
    if dedupe_key is not None and (
        not isinstance(dedupe_key, str) or not dedupe_key or len(dedupe_key) > MAX_DEDUPE_KEY
    ):
        raise InvalidSignalError(
            f"dedupe_key must be a non-empty string of at most {MAX_DEDUPE_KEY} characters, "
            f"got {dedupe_key!r}"
        )
    problems = json_problems(payload, "payload")
    if problems:
        raise InvalidSignalError("payload is not plain JSON: " + "; ".join(problems))
    now = now or datetime.now(UTC)
    wf = lock_workflow(conn, workflow_id)

    a, s, sg = t.awaits, t.steps, t.signals
    found = conn.execute(
        select(a.c.step, a.c.state, a.c.signal_id, s.c.state.label("step_state"), s.c.queue)
        .join(s, (s.c.workflow_id == a.c.workflow_id) & (s.c.name == a.c.step))
        .where(a.c.workflow_id == workflow_id, a.c.signal == name)
    ).first()
    view = (
        None
        if found is None
        else AwaitView(
            state=AwaitState(found.state),
            step_state=StepState(found.step_state),
            has_signal=found.signal_id is not None,
        )
    )
    prior: PriorSignal | None = None
    if dedupe_key is not None:
        first = conn.execute(
            select(sg.c.payload)
            .where(
                sg.c.workflow_id == workflow_id,
                sg.c.name == name,
                sg.c.dedupe_key == dedupe_key,
                sg.c.classification.not_in(
                    (SignalClassification.DUPLICATE.value, SignalClassification.AMBIGUOUS.value)
                ),
            )
            .order_by(sg.c.id)
            .limit(1)
        ).first()
        prior = None if first is None else PriorSignal(first.payload)
    decision = classify_signal(view, prior, payload)
    kind = decision.classification
    step = None if found is None else found.step

    signal_id = int(
        conn.execute(
            insert(sg)
            .values(
                workflow_id=workflow_id,
                name=name,
                step=step,
                classification=kind.value,
                payload=payload,
                dedupe_key=dedupe_key,
                reason=decision.reason,
                source=source,
                created_at=now,
                consumed_at=now if kind is SignalClassification.CONSUMED else None,
            )
            .returning(sg.c.id)
        ).scalar_one()
    )

    released: tuple[str, ...] = ()
    if found is not None and kind is SignalClassification.CONSUMED:
        changes = Changes()
        if set_step_if(
            conn,
            workflow_id,
            found.step,
            StepState.PENDING,
            {
                "state": StepState.AVAILABLE.value,
                "available_at": now,
                "dispatched_at": None,
                "updated_at": now,
            },
        ):
            changes.move(StepState.PENDING, StepState.AVAILABLE)
            released = (found.step,)
        conn.execute(
            update(a)
            .where(a.c.workflow_id == workflow_id, a.c.step == found.step)
            .values(state=AwaitState.SATISFIED.value, signal_id=signal_id, resolved_at=now)
        )
        apply_changes(conn, wf, changes, now)
    elif found is not None and kind is SignalClassification.RECORDED:
        # Held on the await; the release that activates it consumes it.
        conn.execute(
            update(a)
            .where(a.c.workflow_id == workflow_id, a.c.step == found.step)
            .values(signal_id=signal_id)
        )
    elif found is not None and kind is SignalClassification.AMBIGUOUS:
        _flag_for_review(conn, workflow_id, found.step, now)

    return SignalResult(
        workflow_id=workflow_id,
        workflow_name=wf["name"],
        name=name,
        signal_id=signal_id,
        classification=kind.value,
        step=step,
        reason=decision.reason,
        released=released,
    )


def signals_of(conn: Connection, workflow_id: str) -> list[SignalRecord]:
    """Every signal received for the workflow, oldest first."""
    workflow_row(conn, workflow_id)
    sg = t.signals
    return [
        SignalRecord(
            id=r.id,
            name=r.name,
            step=r.step,
            classification=r.classification,
            payload=r.payload,
            dedupe_key=r.dedupe_key,
            reason=r.reason,
            source=r.source,
            created_at=r.created_at,
            consumed_at=r.consumed_at,
        )
        for r in conn.execute(select(sg).where(sg.c.workflow_id == workflow_id).order_by(sg.c.id))
    ]


# -- deadlines: the reconciler's sweep ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpiredAwait:
    workflow_id: str
    step: str
    signal: str
    deadline_at: datetime
    #: Steps cancelled through cancel edges because the step failed.
    cancelled: tuple[str, ...] = ()
    released: tuple[str, ...] = ()
    ready: tuple[ReadyStep, ...] = ()
    workflow_outcome: str | None = None


def expire_awaits(
    conn: Connection, now: datetime, limit: int = 500, pass_id: int | None = None
) -> list[ExpiredAwait]:
    """Active awaits whose deadline has passed without a signal: each fails its step
    (`signal_deadline_expired`), which cascades as any failure, with a recovery row.

    Reads only the active awaits' partial index. An await whose step ended some other way
    (cancelled by hand, say) is closed on the way, without a recovery row.
    """
    a, s = t.awaits, t.steps
    rows = conn.execute(
        select(a.c.workflow_id, a.c.step)
        .where(t.in_state(a.c.state, AwaitState.WAITING.value), a.c.deadline_at <= now)
        .order_by(a.c.deadline_at)
        .limit(limit)
    ).all()
    out = []
    for r in rows:
        wf = lock_workflow(conn, r.workflow_id)
        still = conn.execute(
            select(
                a.c.state,
                a.c.signal,
                a.c.signal_id,
                a.c.deadline_at,
                a.c.activated_at,
                s.c.state.label("step_state"),
            )
            .join(s, (s.c.workflow_id == a.c.workflow_id) & (s.c.name == a.c.step))
            .where(a.c.workflow_id == r.workflow_id, a.c.step == r.step)
        ).first()
        if still is None or not await_expired(AwaitState(still.state), still.deadline_at, now):
            continue
        if still.signal_id is not None or still.step_state != StepState.PENDING.value:
            # Not waiting any more: it had its signal, or its step ended otherwise.
            if StepState(still.step_state) is not StepState.PENDING:
                close_await(conn, r.workflow_id, r.step, AwaitState.CANCELLED, now)
            continue
        changes = Changes()
        set_step_if(
            conn,
            r.workflow_id,
            r.step,
            StepState.PENDING,
            {
                "state": StepState.FAILED.value,
                "terminal_cause": SIGNAL_DEADLINE_EXPIRED,
                "finished_at": now,
                "updated_at": now,
            },
        )
        changes.move(StepState.PENDING, StepState.FAILED)
        close_await(conn, r.workflow_id, r.step, AwaitState.EXPIRED, now)
        reconcile_descendants(conn, r.workflow_id, [r.step], changes, now)
        outcome = apply_changes(conn, wf, changes, now)
        record_recovery(
            conn,
            workflow_id=r.workflow_id,
            step=r.step,
            repair="await_expired",
            reason=f"no signal {still.signal!r} arrived by its deadline "
            f"{still.deadline_at.isoformat()}; the step failed"
            + (f" and cancelled {', '.join(changes.cancelled)}" if changes.cancelled else ""),
            now=now,
            pass_id=pass_id,
            evidence={
                "signal": still.signal,
                "activated_at": still.activated_at.isoformat() if still.activated_at else None,
                "deadline_at": still.deadline_at.isoformat(),
                "cancelled": list(changes.cancelled),
            },
        )
        out.append(
            ExpiredAwait(
                workflow_id=r.workflow_id,
                step=r.step,
                signal=still.signal,
                deadline_at=still.deadline_at,
                cancelled=tuple(changes.cancelled),
                released=tuple(changes.released),
                ready=tuple(changes.ready),
                workflow_outcome=outcome,
            )
        )
    return out
