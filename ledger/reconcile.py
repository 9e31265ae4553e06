"""The reconciler's ledger side: find what the streams lost, repair it, keep the record.

Each finder reads an index over recent rows (steps finished, outcomes recorded since a
watermark) or over one live state, so a pass costs in proportion to the recent activity
and what it finds, not to the size of the ledger. Each repair re-checks its condition
under the workflow lock and is idempotent, so two reconcilers (two hosts) running at the
same time never apply anything twice: the second finds nothing left to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Exists,
    String,
    and_,
    cast,
    exists,
    insert,
    or_,
    select,
    update,
)

from ledger import tables as t
from ledger.callback_jobs import undispatch_all_callbacks
from ledger.changes import Changes
from ledger.children import children_with_deps
from ledger.db import lock_event, lock_workflow
from ledger.evidence import record_evidence
from ledger.model import ReadyStep
from ledger.recoveries import record_recovery
from ledger.rules import TERMINAL_STATES, AwaitState, EdgePolicy, StepState
from ledger.transitions import apply_changes, reconcile_descendants

_TERMINAL = [s.value for s in TERMINAL_STATES]
#: The terminal states that cancel a child through a `cancel` edge (`dependency_cancels`).
_CANCELLING = [StepState.FAILED.value, StepState.CANCELLED.value]


# -- passes ------------------------------------------------------------------------------


def start_pass(conn: Connection, host: str, now: datetime) -> int:
    result = conn.execute(
        insert(t.reconciler_passes)
        .values(host=host, started_at=now)
        .returning(t.reconciler_passes.c.id)
    )
    return int(result.scalar_one())


def finish_pass(conn: Connection, pass_id: int, summary: dict[str, Any], now: datetime) -> None:
    conn.execute(
        update(t.reconciler_passes)
        .where(t.reconciler_passes.c.id == pass_id)
        .values(finished_at=now, summary=summary)
    )


#: In a pass's summary: where the next pass must look from, when this one found more
#: to repair than one batch and left the rest (ISO 8601).
RESUME_FROM = "resume_from"


def resume_point(conn: Connection) -> datetime | None:
    """Where the next pass looks from: when the latest finished pass started — or, if
    that pass left findings behind (a batch filled), where it looked from itself, so
    what it left stays in the next pass's window. None before the first pass."""
    p = t.reconciler_passes
    # Newest first by primary key: an index walk however many passes are on record.
    row = conn.execute(
        select(p.c.started_at, p.c.summary)
        .where(p.c.finished_at.is_not(None))
        .order_by(p.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    left = (row.summary or {}).get(RESUME_FROM)
    return datetime.fromisoformat(left) if left else row.started_at


# -- completion events that never arrived ---------------------------------------------


@dataclass(frozen=True, slots=True)
class DroppedEvent:
    workflow_id: str
    step: str
    attempt: int
    status: str
    key: str
    #: Steps released or cancelled because the release had not been applied.
    repaired: tuple[str, ...] = ()


def _event_key(a: Any) -> Any:
    """The completion event's idempotency key, computed in SQL from an attempt row."""
    return a.c.workflow_id + ":" + a.c.step + ":" + cast(a.c.attempt, String) + ":" + a.c.status


def find_dropped_events(
    conn: Connection, since: datetime, until: datetime, limit: int
) -> list[tuple[str, str, int, str]]:
    """Outcomes workers recorded between `since` and `until` whose completion event no
    consumer ever consumed (and nobody declared dropped yet)."""
    a, e = t.attempts, t.evidence
    key = _event_key(a)
    accounted = exists().where(
        e.c.workflow_id == a.c.workflow_id,
        e.c.kind == "event",
        e.c.classification.in_(("consumed", "dropped")),
        e.c.dedupe_key == key,
    )
    rows = conn.execute(
        select(a.c.workflow_id, a.c.step, a.c.attempt, a.c.status)
        .where(
            a.c.recorded_at >= since,
            a.c.recorded_at < until,
            a.c.source == "worker",
            ~accounted,
        )
        .order_by(a.c.recorded_at)
        .limit(limit)
    ).all()
    return [(r.workflow_id, r.step, r.attempt, r.status) for r in rows]


def repair_dropped_event(
    conn: Connection,
    workflow_id: str,
    step: str,
    attempt: int,
    status: str,
    now: datetime,
    pass_id: int | None,
    source: str,
) -> DroppedEvent | None:
    """Declare one event dropped (once: the unique index on accounted events and the
    workflow lock see to it) and apply whatever it would have applied."""
    key = f"{workflow_id}:{step}:{attempt}:{status}"
    # The event's lock first, as consumers take it: so a consumer accounting for this
    # very event right now finishes (or waits) and the lookup below sees its row.
    lock_event(conn, key)
    wf = lock_workflow(conn, workflow_id)
    e = t.evidence
    already = conn.execute(
        select(e.c.id).where(
            e.c.workflow_id == workflow_id,
            e.c.kind == "event",
            e.c.dedupe_key == key,
            e.c.classification.in_(("consumed", "dropped")),
        )
    ).first()
    if already is not None:
        return None
    record_evidence(
        conn,
        workflow_id=workflow_id,
        step=step,
        kind="event",
        classification="dropped",
        source=source,
        now=now,
        status=status,
        attempt=attempt,
        dedupe_key=key,
        reason="not_consumed_in_time",
    )
    repaired: list[str] = []
    state = conn.execute(
        select(t.steps.c.state).where(t.steps.c.workflow_id == workflow_id, t.steps.c.name == step)
    ).scalar()
    if state is not None and StepState(state) in TERMINAL_STATES:
        changes = Changes()
        reconcile_descendants(conn, workflow_id, [step], changes, now)
        repaired = changes.released + changes.cancelled
        if repaired:
            apply_changes(conn, wf, changes, now)
    record_recovery(
        conn,
        workflow_id=workflow_id,
        step=step,
        repair="dropped_event",
        reason=f"the completion event for attempt {attempt} ({status}) was never consumed"
        + (f"; applied the release of {', '.join(repaired)}" if repaired else ""),
        now=now,
        pass_id=pass_id,
        evidence={"key": key, "repaired": repaired},
    )
    return DroppedEvent(workflow_id, step, attempt, status, key, tuple(repaired))


# -- releases that were never applied ---------------------------------------------------


#: A child's parents, for the release finder's EXISTS tests.
_qe, _q = t.edges.alias("qe"), t.steps.alias("q")


def find_unapplied_releases(conn: Connection, since: datetime, limit: int) -> list[tuple[str, str]]:
    """(workflow, parent) pairs: a step that finished since `since` and has a pending
    child owed a change (`child_is_owed` of `ledger.rules.decide_child`): one of its parents
    ended in a way that cancels it, or every parent has ended and it is not already
    waiting for its signal. The repair checks again under the workflow's lock.

    A child waiting on an unfinished parent is left out here, in the query: under a
    fan-in every finished parent is such a pair until the last one ends, and repairing
    each would take its workflow's lock to find nothing owed."""
    p, e, c = t.steps.alias("p"), t.edges, t.steps.alias("c")
    rows = conn.execute(
        select(p.c.workflow_id, p.c.name)
        .join(e, and_(e.c.workflow_id == p.c.workflow_id, e.c.parent == p.c.name))
        .join(c, and_(c.c.workflow_id == e.c.workflow_id, c.c.name == e.c.child))
        .where(
            p.c.finished_at >= since,
            p.c.state.in_(_TERMINAL),
            c.c.state == StepState.PENDING.value,
            # What `child_is_owed` asks of `decide_child`: a parent that cancels the child, or
            # none still unfinished and no await already active (a step released by a
            # signal held for it is owed; one still waiting for its signal is not).
            or_(
                _a_parent(
                    c, _q.c.state.in_(_CANCELLING) & (_qe.c.policy == EdgePolicy.CANCEL.value)
                ),
                ~_a_parent(c, _q.c.state.not_in(_TERMINAL)) & ~_active_await(c),
            ),
        )
        .distinct()
        .limit(limit)
    ).all()
    return [(r.workflow_id, r.name) for r in rows]


def _a_parent(child: Any, condition: ColumnElement[bool]) -> Exists:
    """EXISTS a parent of `child` (a steps alias) meeting `condition` (on `_qe`, `_q`)."""
    return exists(
        select(1)
        .select_from(
            _qe.join(_q, and_(_q.c.workflow_id == _qe.c.workflow_id, _q.c.name == _qe.c.parent))
        )
        .where(_qe.c.workflow_id == child.c.workflow_id, _qe.c.child == child.c.name, condition)
    )


def _active_await(child: Any) -> Exists:
    """EXISTS an await of `child` already activated (or closed), with no signal held."""
    aw = t.awaits
    return exists(
        select(1).where(
            aw.c.workflow_id == child.c.workflow_id,
            aw.c.step == child.c.name,
            aw.c.signal_id.is_(None),
            aw.c.state != AwaitState.PENDING.value,
        )
    )


def repair_releases(
    conn: Connection,
    workflow_id: str,
    parent: str,
    now: datetime,
    pass_id: int | None,
) -> list[str]:
    """Apply the release or cascade `parent`'s children are owed, if any; the steps changed."""
    wf = lock_workflow(conn, workflow_id)
    owed = [
        kid.name
        for kid in children_with_deps(conn, workflow_id, parent)
        if kid.state is StepState.PENDING and child_is_owed(kid.decide().kind, kid.await_state)
    ]
    if not owed:
        return []
    changes = Changes()
    reconcile_descendants(conn, workflow_id, [parent], changes, now)
    apply_changes(conn, wf, changes, now)
    changed = changes.released + changes.cancelled + changes.awaiting
    for step in changed:
        action = (
            "released"
            if step in changes.released
            else "cancelled"
            if step in changes.cancelled
            else "activated the await of"
        )
        record_recovery(
            conn,
            workflow_id=workflow_id,
            step=step,
            repair="release",
            reason=f"{parent!r} finished but {step!r} was still pending; {action} it",
            now=now,
            pass_id=pass_id,
            evidence={"parent": parent, "action": action},
        )
    return changed


def child_is_owed(decision: str, await_state: AwaitState | None) -> bool:
    """A pending child is owed a change: a release or a cascade, or — its dependencies
    satisfied and its signal not here — the activation of its await."""
    if decision == "await":
        return await_state is AwaitState.PENDING
    return decision != "wait"


# -- streams lost altogether --------------------------------------------------------------


def undispatch_all_available(conn: Connection) -> list[ReadyStep]:
    """After Redis lost its data every ready message is gone: mark every available step
    undispatched so the dispatcher sends it again. Returns the steps, for the record."""
    s = t.steps
    # One UPDATE ... RETURNING: exactly the steps this statement undispatched are
    # reported (and get recovery rows), even if a dispatcher marks others meanwhile.
    rows = conn.execute(
        update(s)
        .where(t.in_state(s.c.state, StepState.AVAILABLE.value), s.c.dispatched_at.is_not(None))
        .values(dispatched_at=None)
        .returning(s.c.workflow_id, s.c.name, s.c.queue, s.c.priority)
    ).all()
    steps = [ReadyStep(r.workflow_id, r.name, r.queue, r.priority) for r in rows]
    return steps + undispatch_all_callbacks(conn)


def live_queues(conn: Connection) -> list[str]:
    """Queues with steps that are available or executing: their ready streams matter.

    One query per state, so each reads its own partial index rather than the table.
    """
    s = t.steps
    queues: dict[str, None] = {}
    for state in (StepState.AVAILABLE, StepState.EXECUTING):
        for q in conn.execute(select(s.c.queue).where(s.c.state == state.value).distinct()):
            queues[q.queue] = None
        c = t.callbacks
        for q in conn.execute(select(c.c.queue).where(c.c.state == state.value).distinct()):
            queues[q.queue] = None
    return list(queues)
