"""Consuming completion events: the engine's second look at every recorded outcome.

`complete_step` already applied the release in the outcome's own transaction; the
consumer's job is to make sure of it (idempotently: a repair is a no-op when nothing is
missing), to dispatch released children nobody dispatched yet, and to keep each delivery
as evidence — `consumed` the first time, `duplicate` after, `late` when the step has
moved on to a newer attempt, `unmatched` when the event names nothing in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from ledger import tables as t
from ledger.db import lock_event, lock_workflow
from ledger.evidence import record_evidence
from ledger.model import ReadyStep
from ledger.recoveries import record_recovery
from ledger.rules import TERMINAL_STATES, StepState
from ledger.transitions import Changes, apply_changes, mark_dispatched, reconcile_descendants


@dataclass(frozen=True, slots=True)
class CompletionEventView:
    """What the ledger needs from a completion event (decoding is the engine's job)."""

    workflow_id: str
    step: str
    status: str
    attempt: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Consumed:
    event: CompletionEventView
    #: consumed | duplicate | late | unmatched
    classification: str
    #: Released children this delivery marked dispatched: publish them after commit.
    ready: tuple[ReadyStep, ...] = ()
    #: Steps whose release this delivery found missing and applied.
    repaired: tuple[str, ...] = ()


def consume_completions(
    conn: Connection, events: Sequence[CompletionEventView], now: datetime, source: str
) -> list[Consumed]:
    """Consume a batch in one transaction. Events are taken in workflow-id order (the
    order every locker of workflows uses), so overlapping batches do not deadlock; the
    rare one that does (two consumers taking the same redelivered events in another
    order) is rolled back by PostgreSQL and retried as a transient error."""
    order = sorted(range(len(events)), key=lambda i: (events[i].workflow_id, i))
    out: dict[int, Consumed] = {}
    for i in order:
        out[i] = _consume_one(conn, events[i], now, source)
    return [out[i] for i in range(len(events))]


def _consume_one(conn: Connection, ev: CompletionEventView, now: datetime, source: str) -> Consumed:
    def keep(classification: str, reason: str | None = None) -> Consumed:
        # An event may name ids longer than any the ledger holds (it is then unmatched);
        # the evidence keeps what fits rather than failing the whole batch.
        record_evidence(
            conn,
            workflow_id=ev.workflow_id[: t.WORKFLOW_ID],
            step=ev.step[: t.STEP_NAME],
            kind="event",
            classification=classification,
            source=source,
            now=now,
            status=ev.status,
            attempt=ev.attempt,
            reason=reason,
            dedupe_key=ev.idempotency_key[:300],
        )
        return Consumed(ev, classification)

    w, s, e, a = t.workflows, t.steps, t.evidence, t.attempts
    # The workflow, the step and the outcome row the event names, in one statement.
    row = conn.execute(
        select(w.c.id, s.c.state, s.c.attempt, a.c.attempt.label("outcome_attempt"))
        .select_from(
            w.outerjoin(s, (s.c.workflow_id == w.c.id) & (s.c.name == ev.step)).outerjoin(
                a,
                (a.c.workflow_id == s.c.workflow_id)
                & (a.c.step == s.c.name)
                & (a.c.attempt == ev.attempt),
            )
        )
        .where(w.c.id == ev.workflow_id)
    ).first()
    if row is None:
        return keep("unmatched", "no_such_workflow")
    if row.state is None:
        return keep("unmatched", "no_such_step")
    # Not the workflow lock (yet): the workers recording this workflow's next outcomes
    # need it now, and a consumer batch holding it would stall them. Accounting for one
    # event needs only that nobody else accounts for the same event meanwhile. (The
    # step's row may be read before this lock: consumers never change it.)
    lock_event(conn, ev.idempotency_key)
    accounted = conn.execute(
        select(e.c.classification).where(
            e.c.workflow_id == ev.workflow_id,
            e.c.dedupe_key == ev.idempotency_key,
            e.c.kind == "event",
            e.c.classification.in_(("consumed", "dropped")),
        )
    ).scalar()
    if accounted == "consumed":
        return keep("duplicate")
    if accounted == "dropped":
        # The reconciler gave up waiting for this event and repaired without it.
        return keep("late", "arrived_after_declared_dropped")
    if row.attempt > ev.attempt:
        return keep("late", "newer_attempt_started")

    record_evidence(
        conn,
        workflow_id=ev.workflow_id,
        step=ev.step,
        kind="event",
        classification="consumed",
        source=source,
        now=now,
        status=ev.status,
        attempt=ev.attempt,
        dedupe_key=ev.idempotency_key,
    )
    if StepState(row.state) not in TERMINAL_STATES:
        return Consumed(ev, "consumed")
    if row.attempt == ev.attempt and row.outcome_attempt is not None:
        # The step's latest outcome has its attempt row, and `complete_step` (like a
        # workflow cancel) writes that row in the same transaction as the release: the row
        # is proof the release was applied, so neither the walk over the children nor the
        # workflow lock is needed (dispatching is a conditional update of its own). A step
        # made terminal any other way (a lost write, a hand edit) has no such row and gets
        # the full check below.
        ready = mark_dispatched(conn, _undispatched_children(conn, ev.workflow_id, ev.step), now)
        return Consumed(ev, "consumed", ready)

    # Make sure the release happened (a no-op unless something was lost), then hand out
    # every available child of this step that nobody has dispatched yet.
    wf = lock_workflow(conn, ev.workflow_id)
    changes = Changes()
    reconcile_descendants(conn, ev.workflow_id, [ev.step], changes, now)
    for step in changes.released + changes.cancelled:
        record_recovery(
            conn,
            workflow_id=ev.workflow_id,
            step=step,
            repair="release",
            reason=f"completion event for {ev.step!r} found the release not applied",
            now=now,
            evidence={"event": ev.idempotency_key},
        )
    if changes.released or changes.cancelled:
        apply_changes(conn, wf, changes, now)
    ready = mark_dispatched(conn, _undispatched_children(conn, ev.workflow_id, ev.step), now)
    return Consumed(ev, "consumed", ready, tuple(changes.released + changes.cancelled))


def _undispatched_children(conn: Connection, workflow_id: str, parent: str) -> list[ReadyStep]:
    e, c = t.edges, t.steps
    rows = conn.execute(
        select(c.c.name, c.c.queue, c.c.priority)
        .join(e, (e.c.workflow_id == c.c.workflow_id) & (e.c.child == c.c.name))
        .where(
            e.c.workflow_id == workflow_id,
            e.c.parent == parent,
            c.c.state == StepState.AVAILABLE.value,
            c.c.dispatched_at.is_(None),
        )
        .order_by(c.c.position)
    ).all()
    return [ReadyStep(workflow_id, r.name, r.queue, r.priority) for r in rows]
