"""Claiming steps for workers, their leases, and handing released steps back.

A claim is a conditional update (`available` -> `executing`), so two deliveries of the
same ready message can never both run the step: the second finds it `executing` and is
recorded as a `duplicate` delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from ledger import direct
from ledger import tables as t
from ledger.changes import Changes
from ledger.children import parent_results_json
from ledger.db import ReadAhead, forget_row, hand_on_row, lock_workflow, take_read_ahead
from ledger.evidence import record_evidence
from ledger.model import Claim as Claim
from ledger.placeholders import resolved_args
from ledger.rules import ClaimVerdict, StepState, classify_claim
from ledger.steps import step_not_found
from ledger.transitions import apply_changes, set_step_if

#: A message is stale when published this much before its step's latest offer; the
#: margin absorbs clock differences between the hosts that release and dispatch.
STALE_MARGIN = timedelta(milliseconds=500)


def _stale(
    message_at: datetime | None, available_at: datetime | None, dispatched_at: datetime | None
) -> bool:
    offers = [t for t in (available_at, dispatched_at) if t is not None]
    return message_at is not None and bool(offers) and message_at < max(offers) - STALE_MARGIN


#: How a ready message that cannot claim its step is kept as evidence.
_DELIVERY_EVIDENCE = {
    ClaimVerdict.DUPLICATE: "duplicate",
    ClaimVerdict.LATE: "late",
    # A step not released yet, or waiting for its retry time: an old message replayed.
    ClaimVerdict.NOT_READY: "replayed",
}


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """The step could not be claimed; the delivery was recorded as evidence."""

    workflow_id: str
    step: str
    verdict: ClaimVerdict
    state: StepState


def claim_step(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    source: str = "worker",
    message_at: datetime | None = None,
    workflow_locked: bool = False,
) -> Claim | ClaimRefused:
    """Claim `step` for one attempt, or refuse (and record) a delivery that cannot.

    `message_at` is when the ready message was published. A message older than the
    step's latest offer (its release or dispatch) comes from an earlier dispatch —
    delayed or replayed. It still claims the step, which must run, but is kept as
    `replayed` evidence so the stale message is not invisible.

    `workflow_locked`: the caller's transaction already holds the workflow lock (the
    worker's hand-off claims a child in its parent's outcome transaction), so it is not
    taken again.
    """
    postgres = conn.dialect.name == "postgresql"
    if workflow_locked:
        forget_row(conn, workflow_id)  # the claim moves the counters in place
    else:
        lock_workflow(conn, workflow_id)
    if postgres:
        # The common case, the step available: one statement takes it and reads it.
        taken = _take_at_once(conn, workflow_id, step, owner, lease_seconds, now)
        if taken is not None:
            claim, offers = taken
            if _stale(message_at, *offers):
                _record_stale_claim(conn, claim, source, now)
            return claim
    # SQLite; on PostgreSQL only a step that is not available gets here, to be refused.
    row = conn.execute(_CLAIM_READ, {"b_wf": workflow_id, "b_step": step}).mappings().first()
    if row is None:
        raise step_not_found(conn, workflow_id, step)
    state = StepState(row["state"])
    verdict = classify_claim(state)
    if verdict is not ClaimVerdict.CLAIM:
        classification = _DELIVERY_EVIDENCE[verdict]
        record_evidence(
            conn,
            workflow_id=workflow_id,
            step=step,
            kind="delivery",
            classification=classification,
            source=source,
            now=now,
            attempt=row["attempt"],
            reason=f"step_{state.value}",
        )
        return ClaimRefused(workflow_id, step, verdict, state)

    attempt = row["attempt"] + 1
    expires = now + timedelta(seconds=lease_seconds)
    _take(conn, workflow_id, step, attempt=attempt, owner=owner, expires=expires, now=now)
    results = _parent_results(conn, workflow_id, step)
    claim = _claim_from(row, step, attempt=attempt, owner=owner, expires=expires, results=results)
    if _stale(message_at, row["available_at"], row["dispatched_at"]):
        _record_stale_claim(conn, claim, source, now)
    return claim


def _claim_from(
    row: Mapping[Any, Any],
    step: str,
    *,
    attempt: int,
    owner: str,
    expires: datetime,
    results: dict[str, Any],
) -> Claim:
    return Claim(
        workflow_id=row["workflow_id"],
        workflow_name=row["workflow_name"],
        step=step,
        attempt=attempt,
        max_attempts=row["max_attempts"],
        worker=row["worker"],
        queue=row["queue"],
        args=resolved_args(row["args"], results),
        workflow_context=row["workflow_context"],
        dependency_results=results,
        lease_owner=owner,
        lease_expires_at=expires,
        available_at=row["available_at"],
        signal=row["released_by_signal"],
    )


def _record_stale_claim(conn: Connection, claim: Claim, source: str, now: datetime) -> None:
    """The claiming message came from an earlier dispatch (delayed or replayed): it still
    claims the step, which must run, but is kept as `replayed` evidence."""
    record_evidence(
        conn,
        workflow_id=claim.workflow_id,
        step=claim.step,
        kind="delivery",
        classification="replayed",
        source=source,
        now=now,
        attempt=claim.attempt - 1,
        reason="stale_message_claimed",
    )


_s, _aw, _sg, _w, _r, _e = t.steps, t.awaits, t.signals, t.workflows, t.results, t.edges


def _released_by_signal(workflow_id: Any, step: Any) -> Any:
    """The payload of the signal that released the step (for a step that awaited one)."""
    return (
        select(_sg.c.payload)
        .join(_aw, _aw.c.signal_id == _sg.c.id)
        .where(_aw.c.workflow_id == workflow_id, _aw.c.step == step)
        .scalar_subquery()
        .label("released_by_signal")
    )


# The step's row, its workflow's name and context, and the payload of the signal that
# released it: one statement, built once.
_CLAIM_READ = (
    select(
        _s,
        _w.c.name.label("workflow_name"),
        _w.c.context.label("workflow_context"),
        _released_by_signal(_s.c.workflow_id, _s.c.name),
    )
    .join(_w, _w.c.id == _s.c.workflow_id)
    .where(_s.c.workflow_id == bindparam("b_wf"), _s.c.name == bindparam("b_step"))
)
_CLAIM_COUNTERS = (
    update(_w)
    .where(_w.c.id == bindparam("b_id"))
    .values(
        available_count=_w.c.available_count - 1,
        executing_count=_w.c.executing_count + 1,
        updated_at=bindparam("b_now"),
    )
)
# The step's parents, each with its stored result if it has one. Correlated lookups, not
# a join: with the join the planner could (and on a freshly filled table did) walk every
# result of the workflow for each parent — 5 ms a claim on a 200-step chain.
_stored = (_r.c.workflow_id == _e.c.workflow_id) & (_r.c.step == _e.c.parent)
_PARENT_RESULTS = select(
    _e.c.parent,
    select(_r.c.attempt).where(_stored).scalar_subquery().label("attempt"),
    select(_r.c.payload).where(_stored).scalar_subquery().label("payload"),
).where(_e.c.workflow_id == bindparam("b_wf"), _e.c.child == bindparam("b_step"))
# PostgreSQL, a hand-off claim (the workflow locked, the step just released, no message to
# judge): the take and the claim's read are one statement. The step's move is a CTE; the
# workflow's counters move only if it took the step, and the claim's columns come back
# through that update's RETURNING.
_TAKEN = (
    update(_s)
    .where(
        _s.c.workflow_id == bindparam("b_wf"),
        _s.c.name == bindparam("b_step"),
        _s.c.state == StepState.AVAILABLE.value,
    )
    .values(
        state=StepState.EXECUTING.value,
        attempt=_s.c.attempt + 1,
        lease_owner=bindparam("bs_lease_owner"),
        lease_expires_at=bindparam("bs_lease_expires_at"),
        updated_at=bindparam("b_now"),
    )
    .returning(
        _s.c.workflow_id,
        _s.c.name,
        _s.c.attempt,
        _s.c.max_attempts,
        _s.c.worker,
        _s.c.queue,
        _s.c.args,
        _s.c.available_at,
        _s.c.dispatched_at,
    )
    .cte("taken")
)
_TAKE_AT_ONCE = (
    update(_w)
    .where(_w.c.id == bindparam("b_wf"), _w.c.id == _TAKEN.c.workflow_id)
    .values(
        available_count=_w.c.available_count - 1,
        executing_count=_w.c.executing_count + 1,
        updated_at=bindparam("b_now"),
    )
    .returning(
        _TAKEN.c.workflow_id,
        _TAKEN.c.attempt,
        _TAKEN.c.max_attempts,
        _TAKEN.c.worker,
        _TAKEN.c.queue,
        _TAKEN.c.args,
        _TAKEN.c.available_at,
        _TAKEN.c.dispatched_at,
        _w.c.name.label("workflow_name"),
        _w.c.context.label("workflow_context"),
        _released_by_signal(_TAKEN.c.workflow_id, _TAKEN.c.name),
        parent_results_json(_TAKEN.c.workflow_id, _TAKEN.c.name).label("parent_results"),
        # The workflow row as the claim leaves it, for the next operation of a group.
        *(column.label(f"w_{column.name}") for column in _w.c),
    )
)


def claim_read_ahead(
    workflow_id: str, step: str, owner: str, lease_seconds: float, now: datetime
) -> ReadAhead:
    """A claim's first statement (the one-statement take) for a group's scope to send
    with the lock (`ledger.db.locked_with_reads`); PostgreSQL. The claim must then be
    made with the same owner, lease and `now`."""
    params = {
        "b_wf": workflow_id,
        "b_step": step,
        "b_now": now,
        "bs_lease_owner": owner,
        "bs_lease_expires_at": now + timedelta(seconds=lease_seconds),
    }
    key = ("claim", workflow_id, step, owner, lease_seconds, now)
    return key, _TAKE_AT_ONCE, params


def _take_at_once(
    conn: Connection,
    workflow_id: str,
    step: str,
    owner: str,
    lease_seconds: float,
    now: datetime,
) -> tuple[Claim, tuple[datetime | None, datetime | None]] | None:
    """The claim in one statement, with the step's latest offers (when it was made
    available and dispatched); None if the step was not available (the caller then
    takes the general path, which records why)."""
    key, statement, params = claim_read_ahead(workflow_id, step, owner, lease_seconds, now)
    expires: datetime = params["bs_lease_expires_at"]
    taken = take_read_ahead(conn, key)
    if taken is None:
        taken = direct.rows(conn, statement, params)
    if not taken:
        return None
    row = taken[0]
    hand_on_row(conn, row, prefix="w_")
    results: dict[str, Any] = row["parent_results"] or {}
    claim = _claim_from(
        row, step, attempt=row["attempt"], owner=owner, expires=expires, results=results
    )
    return claim, (row["available_at"], row["dispatched_at"])


def _parent_results(conn: Connection, workflow_id: str, step: str) -> dict[str, Any]:
    return {
        x.parent: x.payload
        for x in conn.execute(_PARENT_RESULTS, {"b_wf": workflow_id, "b_step": step})
        if x.attempt is not None  # a parent without a stored result (it did not complete)
    }


def _take(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    attempt: int,
    owner: str,
    expires: datetime,
    now: datetime,
) -> None:
    """Move the step to `executing` under this lease, and the workflow's counters with it
    (in place: a claim never finishes a workflow)."""
    values = {
        "state": StepState.EXECUTING.value,
        "attempt": attempt,
        "lease_owner": owner,
        "lease_expires_at": expires,
        "updated_at": now,
    }
    set_step_if(conn, workflow_id, step, StepState.AVAILABLE, values)
    conn.execute(_CLAIM_COUNTERS, {"b_id": workflow_id, "b_now": now})


def renew_lease(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    attempt: int,
    lease_seconds: float,
    now: datetime,
) -> bool:
    """Extend a lease this owner still holds; False if it was revoked or the step moved on."""
    s = t.steps
    result = conn.execute(
        update(s)
        .where(
            s.c.workflow_id == workflow_id,
            s.c.name == step,
            s.c.state == StepState.EXECUTING.value,
            s.c.lease_owner == owner,
            s.c.attempt == attempt,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return result.rowcount == 1


def release_claim(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    attempt: int,
    now: datetime,
) -> bool:
    """Hand an executing step back (a worker draining): `executing` -> `available`.

    The attempt stays counted. The step is marked undispatched so it is sent again.
    """
    wf = lock_workflow(conn, workflow_id)
    s = t.steps
    result = conn.execute(
        update(s)
        .where(
            s.c.workflow_id == workflow_id,
            s.c.name == step,
            s.c.state == StepState.EXECUTING.value,
            s.c.lease_owner == owner,
            s.c.attempt == attempt,
        )
        .values(
            state=StepState.AVAILABLE.value,
            lease_owner=None,
            lease_expires_at=None,
            dispatched_at=None,
            available_at=now,
            updated_at=now,
        )
    )
    if result.rowcount != 1:
        return False
    changes = Changes()
    changes.move(StepState.EXECUTING, StepState.AVAILABLE)
    apply_changes(conn, wf, changes, now)
    return True
