"""Recording a step's outcome and reconciling its descendants, in one transaction."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, bindparam, insert, select, tuple_, update

from ledger import direct
from ledger import tables as t
from ledger.callbacks import enqueue_callback
from ledger.changes import Changes, workflow_update
from ledger.children import CHILDREN_JSON, Child, children_with_deps, group_children
from ledger.db import ReadAhead, lock_workflow, notify_dispatcher, take_read_ahead
from ledger.errors import InvalidCompletionError
from ledger.evidence import record_evidence
from ledger.jsonsafe import json_problems
from ledger.model import CALLBACK_JOB, STEP_JOB, Claim, CompletionResult, ReadyStep
from ledger.planned_outcome import (
    OUTCOME_ATTEMPT,
    OUTCOME_RESULT,
    Take,
    plan_releases,
    write_planned_outcome,
)
from ledger.rules import (
    TERMINAL_STATES,
    AwaitState,
    Classification,
    CompletionDecision,
    CompletionStatus,
    RecordedAttempt,
    StepSnapshot,
    StepState,
    await_deadline,
    classify_completion,
    retry_delay_seconds,
    state_for_status,
)
from ledger.steps import step_not_found

_REJECTIONS = {
    "dependencies_not_satisfied": (
        "step {step!r} is pending: its dependencies have not all finished, so it cannot "
        "have run yet. Only `cancelled` may be recorded for a pending step."
    ),
    "attempt_not_started": (
        "step {step!r} has not started attempt {attempt} (its latest is {latest})"
    ),
}


def parse_status(status: str | CompletionStatus) -> CompletionStatus:
    try:
        return CompletionStatus(status)
    except ValueError:
        allowed = ", ".join(s.value for s in CompletionStatus)
        raise InvalidCompletionError(f"unknown status {status!r}; use one of: {allowed}") from None


def complete_step(
    conn: Connection,
    workflow_id: str,
    step: str,
    status: str | CompletionStatus,
    payload: Any = None,
    *,
    attempt: int | None = None,
    source: str = "api",
    now: datetime | None = None,
    retry_at: datetime | None = None,
    dispatch: bool = False,
    reason: str | None = None,
    hand_off_queues: Collection[str] = (),
    hand_off_owner: str | None = None,
    hand_off_lease_seconds: float = 30.0,
) -> CompletionResult:
    """Record an outcome for `step` and apply what follows from it.

    Checks everything it can before writing: an unknown status, a payload that is not
    plain JSON, an unknown workflow or step, or an outcome the step cannot have (a
    pending step cannot have run) raise and write nothing. Outcomes that arrive after
    the step's fate was sealed are kept as evidence and change nothing.

    With `dispatch=True` (the engine's path) the released children are marked dispatched
    in the same transaction and returned in `ready` for the caller to publish. `reason`
    is kept on the attempt row (e.g. lease_expired) unless the rules give their own.

    `hand_off_queues` (with `dispatch=True`): the most urgent released step of one of
    these queues is left undispatched and returned in `hand_off` instead, for the caller
    to claim in this transaction (the worker runs it next, with no ready message).
    With `hand_off_owner` too, this call may claim it itself for that owner, with a
    lease of `hand_off_lease_seconds`, and return the claim in `hand_off_claim` (on
    PostgreSQL when the outcome takes one statement; otherwise `hand_off_claim` is None
    and the caller claims `hand_off`, as `ledger.jobs.complete_job` does).
    """
    parsed = parse_status(status)
    problems = json_problems(payload, "payload")
    if problems:
        raise InvalidCompletionError("payload is not plain JSON: " + "; ".join(problems))
    if attempt is not None and (not isinstance(attempt, int) or attempt < 1):
        raise InvalidCompletionError(f"attempt must be a positive integer, got {attempt!r}")
    now = now or datetime.now(UTC)

    wf = lock_workflow(conn, workflow_id)
    row, history, children = _step_and_history(conn, workflow_id, step)
    state = StepState(row["state"])
    decision = classify_completion(
        StepSnapshot(state, row["attempt"], row["max_attempts"]), history, parsed, payload, attempt
    )

    if decision.classification is Classification.REJECTED:
        template = _REJECTIONS[decision.reason or ""]
        raise InvalidCompletionError(
            template.format(step=step, attempt=attempt, latest=row["attempt"])
        )

    if decision.classification is not Classification.APPLIED:
        record_evidence(
            conn,
            workflow_id=workflow_id,
            step=step,
            kind="completion",
            classification=decision.classification.value,
            source=source,
            now=now,
            status=parsed.value,
            attempt=attempt,
            payload=payload,
            reason=decision.reason,
        )
        if decision.classification is Classification.AMBIGUOUS:
            _flag_for_review(conn, workflow_id, step, now)
        return CompletionResult(
            workflow_id=workflow_id,
            step=step,
            classification=decision.classification,
            status=parsed.value,
            attempt=attempt or row["attempt"],
            reason=decision.reason,
        )

    changes = Changes()
    recorded = decision.status
    new_state = state_for_status(recorded)
    attempt_row = {
        "attempt": decision.record_attempt,
        "status": recorded.value,
        "payload": payload,
        "reason": decision.reason or reason,
        "source": source,
        "recorded_at": now,
    }
    with_result = recorded is CompletionStatus.COMPLETED
    values = outcome_values(decision, now, retry_at)
    changes.move(state, new_state)
    ready: tuple[ReadyStep, ...] = ()
    hand_off: ReadyStep | None = None
    hand_off_claim: Claim | None = None

    releases = None
    if children is not None and new_state in TERMINAL_STATES:
        releases = plan_releases(children, step, new_state)
    if releases is not None:
        # PostgreSQL, and nothing beyond plain releases follows: one statement.
        if dispatch:
            candidates = [ReadyStep(workflow_id, k.name, k.queue, k.priority) for k in releases]
            hand_off = _pick_hand_off(candidates, hand_off_queues)
        take = None
        if hand_off is not None and hand_off_owner is not None:
            take = Take(hand_off.step, hand_off_owner, hand_off_lease_seconds)
        update_, hand_off_claim = write_planned_outcome(
            conn,
            wf,
            step,
            state,
            attempt_row=attempt_row,
            with_result=with_result,
            values=values,
            releases=releases,
            undispatched=hand_off.step if hand_off is not None else None,
            take=take,
            dispatch=dispatch,
            changes=changes,
        )
        outcome = update_.outcome
        if dispatch:
            ready = tuple(r for r in changes.ready if r != hand_off)
        elif changes.ready:
            notify_dispatcher(conn)  # released children for the dispatcher to publish
    else:
        _record_outcome(
            conn,
            workflow_id,
            step,
            state,
            attempt_row=attempt_row,
            with_result=with_result,
            values=values,
        )
        if new_state in TERMINAL_STATES:
            reconcile_descendants(conn, workflow_id, [step], changes, now)
        if dispatch and changes.ready:
            hand_off = _pick_hand_off(changes.ready, hand_off_queues)
            ready = mark_dispatched(conn, [r for r in changes.ready if r is not hand_off], now)
        elif changes.ready:
            notify_dispatcher(conn)  # released children for the dispatcher to publish
        outcome = apply_changes(conn, wf, changes, now)
    return CompletionResult(
        workflow_id=workflow_id,
        step=step,
        classification=Classification.APPLIED,
        status=recorded.value,
        attempt=decision.record_attempt,
        released=tuple(changes.released),
        cancelled=tuple(changes.cancelled),
        workflow_outcome=outcome,
        reason=decision.reason,
        ready=ready,
        hand_off=hand_off,
        hand_off_claim=hand_off_claim,
    )


def _pick_hand_off(released: list[ReadyStep], queues: Collection[str]) -> ReadyStep | None:
    """The highest-priority released step of `queues`, the earliest released on a tie."""
    mine = [r for r in released if r.job == STEP_JOB and r.queue in queues]
    return min(mine, key=lambda r: -r.priority) if mine else None


def _record_outcome(
    conn: Connection,
    workflow_id: str,
    step: str,
    expected: StepState,
    *,
    attempt_row: dict[str, Any],
    with_result: bool,
    values: dict[str, Any],
) -> None:
    """Write an applied outcome: its attempt row, its stored result (for a completion) and
    the step's new state. On PostgreSQL one statement (the inserts ride along as
    data-modifying CTEs); elsewhere three."""
    if conn.dialect.name != "postgresql":
        conn.execute(_INSERT_ATTEMPT, {"workflow_id": workflow_id, "step": step, **attempt_row})
        if with_result:
            conn.execute(
                _INSERT_RESULT,
                {
                    "workflow_id": workflow_id,
                    "step": step,
                    "attempt": attempt_row["attempt"],
                    "payload": attempt_row["payload"],
                    "recorded_at": attempt_row["recorded_at"],
                },
            )
        set_step_if(conn, workflow_id, step, expected, values)
        return
    params = {f"ba_{k}": v for k, v in attempt_row.items()}
    params.update(values, b_wf=workflow_id, b_step=step, b_expected=expected.value)
    conn.execute(_OUTCOME_WITH_RESULT if with_result else _OUTCOME, params)


def mark_dispatched(
    conn: Connection, candidates: Iterable[ReadyStep], now: datetime
) -> tuple[ReadyStep, ...]:
    """Mark available, undispatched steps as dispatched; return those this call marked,
    in the order given.

    Conditional on `dispatched_at IS NULL`, so of two dispatchers racing for a step
    exactly one publishes it. The steps are marked by one statement, however many.
    """
    candidates = list(candidates)
    marked: set[tuple[str, str]] = set()
    steps = [(r.workflow_id, r.step) for r in candidates if r.job != CALLBACK_JOB]
    if steps and conn.dialect.name == "postgresql":
        params = {"b_wfs": [w for w, _ in steps], "b_names": [n for _, n in steps], "b_now": now}
        marked.update((r["workflow_id"], r["name"]) for r in direct.rows(conn, _MARK_PG, params))
    elif steps:
        rows = conn.execute(_MARK_STEPS_DISPATCHED, {"b_keys": steps, "b_now": now})
        marked.update((r.workflow_id, r.name) for r in rows)
    for r in candidates:
        if r.job == CALLBACK_JOB:
            result = conn.execute(
                _dispatch_update(r)
                .where(t.callbacks.c.dispatched_at.is_(None))
                .values(dispatched_at=now)
            )
            if result.rowcount == 1:
                marked.add((r.workflow_id, r.step))
    return tuple(r for r in candidates if (r.workflow_id, r.step) in marked)


def _dispatch_update(r: ReadyStep) -> Any:
    """An UPDATE of the available step (or callback) `r` names."""
    if r.job == CALLBACK_JOB:
        c = t.callbacks
        return update(c).where(
            c.c.workflow_id == r.workflow_id, c.c.state == StepState.AVAILABLE.value
        )
    s = t.steps
    return update(s).where(
        s.c.workflow_id == r.workflow_id,
        s.c.name == r.step,
        s.c.state == StepState.AVAILABLE.value,
    )


def outcome_values(
    decision: CompletionDecision, now: datetime, retry_at: datetime | None
) -> dict[str, Any]:
    """The row values an applied outcome sets on its job (a step or a callback): the new
    state and attempt, the lease given up, and either the terminal cause or the retry
    time (exponential backoff with jitter unless `retry_at` says otherwise)."""
    recorded = decision.status
    new_state = state_for_status(recorded)
    values: dict[str, Any] = {
        "state": new_state.value,
        "attempt": decision.record_attempt,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if new_state in TERMINAL_STATES:
        values.update(
            terminal_cause=decision.reason or recorded.value, finished_at=now, scheduled_at=None
        )
    else:
        delay = retry_delay_seconds(decision.record_attempt, unit_random=random.random())
        values.update(scheduled_at=retry_at or now + timedelta(seconds=delay))
    return values


def reconcile_descendants(
    conn: Connection,
    workflow_id: str,
    finished: Iterable[str],
    changes: Changes,
    now: datetime,
) -> None:
    """Release or cascade-cancel the children of steps that just became terminal.

    Breadth-first: a child cancelled here is itself terminal, so its own children are
    decided next. Every decision reads the states as they are now in this transaction
    and goes through `ledger.rules.decide_child`. Releases are conditional updates
    (`WHERE state = 'pending'`), so nothing is ever released twice.
    """
    queue = deque(finished)
    while queue:
        parent = queue.popleft()
        for kid in children_with_deps(conn, workflow_id, parent):
            if kid.state is not StepState.PENDING:
                continue
            child, deps = kid.name, kid.deps
            decision = kid.decide()
            if decision.kind == "await":
                # Dependencies satisfied, the signal not here yet: the await activates
                # and its deadline starts now.
                if kid.await_state is AwaitState.PENDING:
                    activate_await(conn, workflow_id, child, kid.deadline_ms, now)
                    changes.awaiting.append(child)
                continue
            if decision.kind == "release":
                if set_step_if(
                    conn,
                    workflow_id,
                    child,
                    StepState.PENDING,
                    {
                        "state": StepState.AVAILABLE.value,
                        "available_at": now,
                        "dispatched_at": None,
                        "updated_at": now,
                    },
                ):
                    changes.move(StepState.PENDING, StepState.AVAILABLE)
                    changes.released.append(child)
                    changes.ready.append(ReadyStep(workflow_id, child, kid.queue, kid.priority))
                    if kid.await_state is not None:
                        # Its signal was held: consumed now.
                        close_await(conn, workflow_id, child, AwaitState.SATISFIED, now)
            elif decision.kind == "cancel":
                cause = decision.cause
                root = next(r for d, r in deps if d.step == cause)
                if set_step_if(
                    conn,
                    workflow_id,
                    child,
                    StepState.PENDING,
                    {
                        "state": StepState.CANCELLED.value,
                        "terminal_cause": "cancelled_by_dependency",
                        "cancelled_by_step": cause,
                        "cancel_root_step": root,
                        "finished_at": now,
                        "updated_at": now,
                    },
                ):
                    changes.move(StepState.PENDING, StepState.CANCELLED)
                    changes.cancelled.append(child)
                    queue.append(child)
                    if kid.await_state is not None:
                        close_await(conn, workflow_id, child, AwaitState.CANCELLED, now)


# -- queries ----------------------------------------------------------------------------

# The hot path's statements, built once (see `ledger.db`): per call, only parameters.
_s, _a, _e, _w = t.steps, t.attempts, t.edges, t.workflows
_STEP_AND_HISTORY = (
    select(
        _s.c.state,
        _s.c.attempt,
        _s.c.max_attempts,
        _a.c.attempt.label("h_attempt"),
        _a.c.status.label("h_status"),
        _a.c.payload.label("h_payload"),
        _a.c.reason.label("h_reason"),
    )
    .select_from(
        _s.outerjoin(_a, (_a.c.workflow_id == _s.c.workflow_id) & (_a.c.step == _s.c.name))
    )
    .where(_s.c.workflow_id == bindparam("b_wf"), _s.c.name == bindparam("b_step"))
)
_STEP_HISTORY_AND_CHILDREN = _STEP_AND_HISTORY.add_columns(CHILDREN_JSON.label("children"))
_INSERT_ATTEMPT = insert(_a)
_INSERT_RESULT = insert(t.results)
_SET_STEP_IF = update(_s).where(
    _s.c.workflow_id == bindparam("b_wf"),
    _s.c.name == bindparam("b_step"),
    _s.c.state == bindparam("b_expected"),
)
_MARK_STEPS_DISPATCHED = (
    update(_s)
    .where(
        tuple_(_s.c.workflow_id, _s.c.name).in_(bindparam("b_keys", expanding=True)),
        _s.c.state == StepState.AVAILABLE.value,
        _s.c.dispatched_at.is_(None),
    )
    .values(dispatched_at=bindparam("b_now", type_=_s.c.dispatched_at.type))
    .returning(_s.c.workflow_id, _s.c.name)
)
#: PostgreSQL: the same, joined to the keys as unnested arrays, so each step is found by
#: primary key whatever the statistics say, and one statement text serves every batch
#: size (a list of pairs was a new statement, planned afresh, for each size).
_mark_keys = t.unnested(("workflow_id", "b_wfs", String()), ("name", "b_names", String()))
_MARK_PG = (
    update(_s)
    .where(
        _s.c.workflow_id == _mark_keys.c.workflow_id,
        _s.c.name == _mark_keys.c.name,
        t.in_state(_s.c.state, StepState.AVAILABLE.value),
        _s.c.dispatched_at.is_(None),
    )
    .values(dispatched_at=bindparam("b_now", type_=_s.c.dispatched_at.type))
    .returning(_s.c.workflow_id, _s.c.name)
)
_UPDATE_WORKFLOW = update(_w).where(_w.c.id == bindparam("b_id"))
# PostgreSQL: an outcome's attempt row (and stored result) inserted by the statement that
# moves the step, as data-modifying CTEs — one round trip instead of three. The caller
# holds the workflow lock, so the conditional update cannot miss.
_OUTCOME = _SET_STEP_IF.add_cte(OUTCOME_ATTEMPT)
_OUTCOME_WITH_RESULT = _SET_STEP_IF.add_cte(OUTCOME_ATTEMPT, OUTCOME_RESULT)


def outcome_read_ahead(workflow_id: str, step: str) -> ReadAhead:
    """The outcome's first read (the step, its history, its children) for a group's
    scope to send with the lock (`ledger.db.locked_with_reads`); PostgreSQL."""
    params = {"b_wf": workflow_id, "b_step": step, "b_parent": step}
    return (_outcome_read_key(workflow_id, step), _STEP_HISTORY_AND_CHILDREN, params)


def _outcome_read_key(workflow_id: str, step: str) -> tuple[str, str, str]:
    return ("outcome", workflow_id, step)


def _step_and_history(
    conn: Connection, workflow_id: str, step: str
) -> tuple[dict[str, Any], dict[int, RecordedAttempt], list[Child] | None]:
    """The step's row and its recorded attempts, in one statement (the caller holds the
    workflow lock, so the read sees every earlier holder's writes). On PostgreSQL the
    step's children with their dependencies come with them (as they are before this
    transaction writes anything); elsewhere None."""
    params = {"b_wf": workflow_id, "b_step": step}
    if conn.dialect.name == "postgresql":
        rows = take_read_ahead(conn, _outcome_read_key(workflow_id, step))
        if rows is None:
            rows = direct.rows(conn, _STEP_HISTORY_AND_CHILDREN, {**params, "b_parent": step})
    else:
        rows = direct.rows(conn, _STEP_AND_HISTORY, params)
    if not rows:
        raise step_not_found(conn, workflow_id, step)
    first = rows[0]
    row = {
        "state": first["state"],
        "attempt": first["attempt"],
        "max_attempts": first["max_attempts"],
    }
    history = {
        r["h_attempt"]: RecordedAttempt(
            r["h_attempt"], CompletionStatus(r["h_status"]), r["h_payload"], r["h_reason"]
        )
        for r in rows
        if r["h_attempt"] is not None
    }
    children = None
    if conn.dialect.name == "postgresql":
        children = group_children(first["children"] or [])
    return row, history, children


def set_step_if(
    conn: Connection, workflow_id: str, step: str, expected: StepState, values: dict[str, Any]
) -> bool:
    """Conditional update: applies only if the step is still in `expected`."""
    params = {**values, "b_wf": workflow_id, "b_step": step, "b_expected": expected.value}
    return conn.execute(_SET_STEP_IF, params).rowcount == 1


def apply_changes(
    conn: Connection,
    wf: dict[str, Any],
    changes: Changes,
    now: datetime,
    *,
    cancel_requested: bool = False,
) -> str | None:
    """Move the workflow's counters by `changes`; record its outcome if this finished it.

    Returns the outcome this call recorded (None if the workflow is still running, or had
    finished before: a recorded outcome is never rewritten here).
    """
    update_ = workflow_update(wf, changes, now, cancel_requested=cancel_requested)
    outcome = update_.outcome
    conn.execute(_UPDATE_WORKFLOW, {**update_.values, "b_id": wf["id"]})
    if outcome is not None:
        # In the transaction that records the outcome: the callback is enqueued with it.
        enqueue_callback(conn, wf, outcome, update_.counts, now)
    return outcome


def _flag_for_review(conn: Connection, workflow_id: str, step: str, now: datetime) -> None:
    s, w = t.steps, t.workflows
    conn.execute(
        update(s)
        .where(s.c.workflow_id == workflow_id, s.c.name == step)
        .values(needs_review=True, updated_at=now)
    )
    conn.execute(update(w).where(w.c.id == workflow_id).values(needs_review=True, updated_at=now))


def unmark_dispatched(conn: Connection, steps: Iterable[ReadyStep]) -> int:
    """Undo `mark_dispatched` for steps whose publish failed, so the dispatcher sends them
    on its next pass instead of waiting for the stale-dispatch deadline."""
    count = 0
    for r in steps:
        count += conn.execute(_dispatch_update(r).values(dispatched_at=None)).rowcount
    return count


# -- awaits ---------------------------------------------------------------------------------


def activate_await(
    conn: Connection, workflow_id: str, step: str, deadline_ms: int | None, now: datetime
) -> bool:
    """The step's dependencies are satisfied: its await turns active and the deadline
    starts. Conditional on the await still being pending."""
    a = t.awaits
    return (
        conn.execute(
            update(a)
            .where(
                a.c.workflow_id == workflow_id,
                a.c.step == step,
                a.c.state == AwaitState.PENDING.value,
            )
            .values(
                state=AwaitState.WAITING.value,
                activated_at=now,
                deadline_at=await_deadline(now, deadline_ms),
            )
        ).rowcount
        == 1
    )


def close_await(
    conn: Connection, workflow_id: str, step: str, state: AwaitState, now: datetime
) -> None:
    """Resolve an open await: satisfied (its held signal is consumed now), cancelled or
    expired."""
    a, sg = t.awaits, t.signals
    open_states = (AwaitState.PENDING.value, AwaitState.WAITING.value)
    row = conn.execute(
        select(a.c.signal_id).where(
            a.c.workflow_id == workflow_id, a.c.step == step, a.c.state.in_(open_states)
        )
    ).first()
    if row is None:
        return
    conn.execute(
        update(a)
        .where(a.c.workflow_id == workflow_id, a.c.step == step, a.c.state.in_(open_states))
        .values(state=state.value, resolved_at=now)
    )
    if state is AwaitState.SATISFIED and row.signal_id is not None:
        conn.execute(
            update(sg)
            .where(sg.c.id == row.signal_id, sg.c.consumed_at.is_(None))
            .values(consumed_at=now)
        )
