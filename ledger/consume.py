"""Consuming completion events: the engine's second look at every recorded outcome.

`complete_step` already applied the release in the outcome's own transaction; the
consumer's job is to make sure of it (idempotently: a repair is a no-op when nothing is
missing), to dispatch released children nobody dispatched yet, and to keep each delivery
as evidence — `consumed` the first time, `duplicate` after, `late` when the step has
moved on to a newer attempt, `unmatched` when the event names nothing in the ledger.

A batch costs a handful of statements whatever its size: one read of the rows its events
name, one statement taking their event locks, one read of what is already accounted for,
one insert of the evidence and one read of the children to dispatch (plus a conditional
update per child dispatched). The outcome is the one consuming the events one at a time,
in workflow-id order, would give: each event's classification takes the earlier events of
the batch into account, as sequential processing would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Integer,
    Select,
    String,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    text,
    true,
    tuple_,
)

from ledger import tables as t
from ledger.changes import Changes
from ledger.db import lock_workflow
from ledger.model import ReadyStep
from ledger.recoveries import record_recovery
from ledger.rules import TERMINAL_STATES, StepState
from ledger.transitions import apply_changes, mark_dispatched, reconcile_descendants


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


# The statements are built once: SQLAlchemy then memoises their cache keys, which is most
# of what a statement costs the consumer's CPU. The expanding parameters take a batch's
# values (tuple IN works on PostgreSQL and SQLite alike).
_w, _s, _a, _e, _ed = t.workflows, t.steps, t.attempts, t.evidence, t.edges

#: The workflows, steps and outcome rows a batch names: a row per step found (with its
#: outcome row for the event's attempt, if any, or one row per such outcome), and a row
#: with NULL step columns for a workflow none of whose named steps exists.
_READ_ROWS = (
    select(_w.c.id, _s.c.name, _s.c.state, _s.c.attempt, _a.c.attempt.label("outcome_attempt"))
    .select_from(
        _w.outerjoin(
            _s,
            (_s.c.workflow_id == _w.c.id)
            & tuple_(_s.c.workflow_id, _s.c.name).in_(bindparam("steps", expanding=True)),
        ).outerjoin(
            _a,
            (_a.c.workflow_id == _s.c.workflow_id)
            & (_a.c.step == _s.c.name)
            & tuple_(_a.c.workflow_id, _a.c.step, _a.c.attempt).in_(
                bindparam("outcomes", expanding=True)
            ),
        )
    )
    .where(_w.c.id.in_(bindparam("workflows", expanding=True)))
)

#: PostgreSQL: the same rows (one per event, which the caller folds), each workflow, step
#: and outcome row looked up by primary key for its event (LATERAL, as below). The lists
#: of keys above let the planner scan the workflows, or OR together a bitmap per step,
#: and cost 1.6 ms of planning a batch: each batch size was a new statement text.
_events = t.unnested(
    ("workflow_id", "b_wfs", String()),
    ("step", "b_steps", String()),
    ("attempt", "b_attempts", Integer()),
)
_event_workflow = select(_w.c.id).where(_w.c.id == _events.c.workflow_id).offset(0).lateral("ew")
_event_step = (
    select(_s.c.name, _s.c.state, _s.c.attempt)
    .where(_s.c.workflow_id == _events.c.workflow_id, _s.c.name == _events.c.step)
    .offset(0)
    .lateral("es")
)
_event_outcome = (
    select(_a.c.attempt)
    .where(
        _a.c.workflow_id == _events.c.workflow_id,
        _a.c.step == _events.c.step,
        _a.c.attempt == _events.c.attempt,
    )
    .offset(0)
    .lateral("eo")
)
_READ_ROWS_PG = select(
    _event_workflow.c.id,
    _event_step.c.name,
    _event_step.c.state,
    _event_step.c.attempt,
    _event_outcome.c.attempt.label("outcome_attempt"),
).select_from(
    _events.join(_event_workflow, true())
    .outerjoin(_event_step, true())
    .outerjoin(_event_outcome, true())
)

#: `ledger.db.lock_event` for many keys at once: the same lock (a transaction-level
#: advisory lock on the key's hashtext), taken in one order by every consumer so two
#: batches sharing events cannot deadlock on them. PostgreSQL evaluates a volatile
#: function in the select list after the ORDER BY sort, so the locks follow that order.
_LOCK_EVENTS = text(
    "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest(CAST(:keys AS text[])) AS k "
    "ORDER BY hashtext(k), k"
)

#: An accounted event's evidence row: the predicate of the partial unique index on
#: accounted events, with its constants inline so that index serves even a generic plan.
_IS_ACCOUNTED = (
    _e.c.kind == literal_column("'event'"),
    _e.c.classification.in_([literal_column("'consumed'"), literal_column("'dropped'")]),
)
#: The accounted events among a batch's.
_ACCOUNTED = select(_e.c.workflow_id, _e.c.dedupe_key, _e.c.classification).where(
    tuple_(_e.c.workflow_id, _e.c.dedupe_key).in_(bindparam("keys", expanding=True)),
    *_IS_ACCOUNTED,
)

#: PostgreSQL: the same read, each pair looked up alone in that index (LATERAL, as below).
#: A list of pairs left the planner to walk the index by workflow, or whole, with the
#: pairs as a filter: 7 ms a batch on a 4,500-row table, growing with the ledger.
_pair_keys = t.unnested(("workflow_id", "b_wfs", String()), ("dedupe_key", "b_keys", String()))
_accounted_pair = (
    select(_e.c.workflow_id, _e.c.dedupe_key, _e.c.classification)
    .where(
        _e.c.workflow_id == _pair_keys.c.workflow_id,
        _e.c.dedupe_key == _pair_keys.c.dedupe_key,
        *_IS_ACCOUNTED,
    )
    .offset(0)
    .lateral("ae")
)
_ACCOUNTED_PG = select(
    _accounted_pair.c.workflow_id, _accounted_pair.c.dedupe_key, _accounted_pair.c.classification
).select_from(_pair_keys.join(_accounted_pair, true()))


def accounted_query(
    conn: Connection, keys: Iterable[tuple[str, str]]
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement reading which (workflow, key) events are accounted for, and its
    parameters, for this connection's database."""
    ordered = sorted(keys)
    if conn.dialect.name == "postgresql":
        return _ACCOUNTED_PG, {"b_wfs": [w for w, _ in ordered], "b_keys": [k for _, k in ordered]}
    return _ACCOUNTED, {"keys": ordered}


_INSERT_EVIDENCE = insert(_e)
#: The columns a batch's evidence rows fill (an event's evidence has no payload).
_EVIDENCE_COLUMNS = (
    "workflow_id",
    "step",
    "kind",
    "classification",
    "source",
    "status",
    "attempt",
    "reason",
    "dedupe_key",
    "created_at",
)


def _array_item(column: str) -> Any:
    kind = _e.c[column].type
    return String() if isinstance(kind, String) else kind


_evidence_arrays = (
    func.unnest(
        # Unbounded text: a value too long for its column fails the insert, as one row
        # at a time would, instead of being cut by a cast.
        *(bindparam(f"a_{c}", type_=ARRAY(_array_item(c))) for c in _EVIDENCE_COLUMNS)
    )
    .table_valued(*_EVIDENCE_COLUMNS)
    .render_derived()
)
#: PostgreSQL: a batch's evidence as one statement, each column an array, in batch order
#: (one statement, not one per event).
_INSERT_EVIDENCE_ARRAYS = insert(_e).from_select(
    list(_EVIDENCE_COLUMNS), select(*(_evidence_arrays.c[c] for c in _EVIDENCE_COLUMNS))
)

#: The available, undispatched children of (workflow, parent) pairs, in position order.
_UNDISPATCHED_CHILDREN = (
    select(_ed.c.workflow_id, _ed.c.parent, _s.c.name, _s.c.queue, _s.c.priority)
    .select_from(_s.join(_ed, (_ed.c.workflow_id == _s.c.workflow_id) & (_ed.c.child == _s.c.name)))
    .where(
        tuple_(_ed.c.workflow_id, _ed.c.parent).in_(bindparam("parents", expanding=True)),
        _s.c.state == StepState.AVAILABLE.value,
        _s.c.dispatched_at.is_(None),
    )
    .order_by(_s.c.position)
)
# PostgreSQL: from the (workflow, parent) pairs to their edges, then each child's row by
# primary key (LATERAL lookups the planner cannot flatten, as in `ledger.children`): a
# plain join could scan the workflow's every step when its statistics say workflows are
# small (1 ms an event on a 4,000-step chain).
_pairs = t.unnested(("workflow_id", "b_wfs", String()), ("parent", "b_parents", String()))
_child_edges = (
    select(_ed.c.workflow_id, _ed.c.parent, _ed.c.child)
    .where(_ed.c.workflow_id == _pairs.c.workflow_id, _ed.c.parent == _pairs.c.parent)
    .offset(0)
    .lateral("ce")
)
_undispatched_child = (
    select(_s.c.name, _s.c.queue, _s.c.priority, _s.c.position)
    .where(
        _s.c.workflow_id == _child_edges.c.workflow_id,
        _s.c.name == _child_edges.c.child,
        _s.c.state == StepState.AVAILABLE.value,
        _s.c.dispatched_at.is_(None),
    )
    .limit(1)
    .lateral("uc")
)
_UNDISPATCHED_CHILDREN_PG = (
    select(
        _child_edges.c.workflow_id,
        _child_edges.c.parent,
        _undispatched_child.c.name,
        _undispatched_child.c.queue,
        _undispatched_child.c.priority,
    )
    .select_from(_pairs.join(_child_edges, true()).join(_undispatched_child, true()))
    .order_by(_undispatched_child.c.position)
)


@dataclass(frozen=True, slots=True)
class _StepRow:
    state: str
    attempt: int


def consume_completions(
    conn: Connection, events: Sequence[CompletionEventView], now: datetime, source: str
) -> list[Consumed]:
    """Consume a batch in one transaction, with the outcome of consuming its events one
    at a time in workflow-id order. The batch's event locks are taken first, all at once
    in one global order; the workflow locks a repair needs come after, in workflow-id
    order (the order every locker of workflows uses). So overlapping batches do not
    deadlock each other; a deadlock with another locker is rolled back by PostgreSQL and
    retried by the caller as a transient error."""
    order = sorted(range(len(events)), key=lambda i: (events[i].workflow_id, i))
    if not order:
        return []
    workflows, steps, outcomes = _read_rows(conn, events)

    # Not the workflow lock (yet): the workers recording these workflows' next outcomes
    # need it now, and a consumer batch holding it would stall them. Accounting for an
    # event needs only that nobody else accounts for the same event meanwhile, so each
    # event's lock is held before what is accounted is read (in a later statement, so
    # under READ COMMITTED it sees what an earlier holder committed). The steps' rows
    # may be read before: consumers never change them.
    matched = [i for i in order if (events[i].workflow_id, events[i].step) in steps]
    keys = {(events[i].workflow_id, events[i].idempotency_key) for i in matched}
    if keys and conn.dialect.name == "postgresql":
        # SQLite: every write transaction already holds the database lock.
        conn.execute(_LOCK_EVENTS, {"keys": sorted({key for _, key in keys})})
    accounted: dict[tuple[str, str], str] = {}
    if keys:
        statement, params = accounted_query(conn, keys)
        accounted = {
            (r.workflow_id, r.dedupe_key): r.classification for r in conn.execute(statement, params)
        }

    # Classify in order; an event consumed here accounts for its later deliveries.
    out: dict[int, Consumed] = {}
    evidence: list[dict[str, Any]] = []
    #: Consumed terminal events, in order, and whether the fast path serves them.
    terminal: list[tuple[int, bool]] = []
    for i in order:
        ev = events[i]
        classification, reason = "consumed", None
        row = steps.get((ev.workflow_id, ev.step))
        if ev.workflow_id not in workflows:
            classification, reason = "unmatched", "no_such_workflow"
        elif row is None:
            classification, reason = "unmatched", "no_such_step"
        else:
            already = accounted.get((ev.workflow_id, ev.idempotency_key))
            if already == "consumed":
                classification = "duplicate"
            elif already == "dropped":
                # The reconciler gave up waiting for this event and repaired without it.
                classification, reason = "late", "arrived_after_declared_dropped"
            elif row.attempt > ev.attempt:
                classification, reason = "late", "newer_attempt_started"
        evidence.append(_evidence_row(ev, classification, reason, source, now))
        out[i] = Consumed(ev, classification)
        if classification != "consumed" or row is None:
            continue
        accounted[(ev.workflow_id, ev.idempotency_key)] = "consumed"
        if StepState(row.state) in TERMINAL_STATES:
            # The step's latest outcome has its attempt row, and `complete_step` (like a
            # workflow cancel) writes that row in the same transaction as the release:
            # the row is proof the release was applied, so neither the walk over the
            # children nor the workflow lock is needed (dispatching is a conditional
            # update of its own). A step made terminal any other way (a lost write, a
            # hand edit) has no such row and gets the full check.
            outcome = (ev.workflow_id, ev.step, ev.attempt)
            terminal.append((i, row.attempt == ev.attempt and outcome in outcomes))
    _insert_evidence(conn, evidence)

    # Dispatch (and repair) in order. The fast path's children are read in one statement
    # per run of fast-path events: a slow-path event between two runs may release and
    # dispatch children, and the events after it must see that, as they would one by one.
    run: list[int] = []
    for i, fast in terminal:
        if fast:
            run.append(i)
            continue
        out.update(_dispatch_run(conn, events, run, now))
        run = []
        out[i] = _repair_and_dispatch(conn, events[i], now)
    out.update(_dispatch_run(conn, events, run, now))
    return [out[i] for i in range(len(events))]


def _read_rows(
    conn: Connection, events: Sequence[CompletionEventView]
) -> tuple[set[str], dict[tuple[str, str], _StepRow], set[tuple[str, str, int]]]:
    """The workflows found, the steps found and the (workflow, step, attempt) outcome
    rows found, of those the events name, in one statement."""
    if conn.dialect.name == "postgresql":
        named = sorted({(ev.workflow_id, ev.step, ev.attempt) for ev in events})
        params: dict[str, Any] = {
            "b_wfs": [w for w, _, _ in named],
            "b_steps": [s for _, s, _ in named],
            "b_attempts": [a for _, _, a in named],
        }
        rows = conn.execute(_READ_ROWS_PG, params).all()
    else:
        rows = conn.execute(
            _READ_ROWS,
            {
                "workflows": sorted({ev.workflow_id for ev in events}),
                "steps": sorted({(ev.workflow_id, ev.step) for ev in events}),
                "outcomes": sorted({(ev.workflow_id, ev.step, ev.attempt) for ev in events}),
            },
        ).all()
    workflows = {r.id for r in rows}
    steps = {(r.id, r.name): _StepRow(r.state, r.attempt) for r in rows if r.name is not None}
    outcomes = {(r.id, r.name, r.outcome_attempt) for r in rows if r.outcome_attempt is not None}
    return workflows, steps, outcomes


def _insert_evidence(conn: Connection, evidence: list[dict[str, Any]]) -> None:
    if conn.dialect.name != "postgresql":
        conn.execute(_INSERT_EVIDENCE, evidence)
        return
    if any(row["payload"] is not None for row in evidence):
        raise RuntimeError("an event's evidence has no payload")
    conn.execute(
        _INSERT_EVIDENCE_ARRAYS, {f"a_{c}": [row[c] for row in evidence] for c in _EVIDENCE_COLUMNS}
    )


def _evidence_row(
    ev: CompletionEventView, classification: str, reason: str | None, source: str, now: datetime
) -> dict[str, Any]:
    # An event may name ids longer than any the ledger holds (it is then unmatched); the
    # evidence keeps what fits rather than failing the whole batch. A matched event's ids
    # are the ledger's own, and its key is kept whole, as the accounted lookup reads it.
    cut = classification != "consumed"
    return {
        "workflow_id": ev.workflow_id[: t.WORKFLOW_ID] if cut else ev.workflow_id,
        "step": ev.step[: t.STEP_NAME] if cut else ev.step,
        "kind": "event",
        "classification": classification,
        "source": source,
        "status": ev.status,
        "attempt": ev.attempt,
        "payload": None,
        "reason": reason,
        "dedupe_key": ev.idempotency_key[:300] if cut else ev.idempotency_key,
        "created_at": now,
    }


def _dispatch_run(
    conn: Connection, events: Sequence[CompletionEventView], run: list[int], now: datetime
) -> dict[int, Consumed]:
    """The fast path for a run of consumed events: mark each step's available,
    undispatched children dispatched (each a conditional update: the race guard)."""
    if not run:
        return {}
    children = _undispatched_children(conn, [(events[i].workflow_id, events[i].step) for i in run])
    # One by one, an event would not see a child an earlier one tried: it is dispatched
    # now (by that event or by whoever beat it to it).
    tried: set[tuple[str, str]] = set()
    out = {}
    for i in run:
        ev = events[i]
        todo = [
            r
            for r in children.get((ev.workflow_id, ev.step), ())
            if (r.workflow_id, r.step) not in tried
        ]
        tried.update((r.workflow_id, r.step) for r in todo)
        out[i] = Consumed(ev, "consumed", mark_dispatched(conn, todo, now))
    return out


def _repair_and_dispatch(conn: Connection, ev: CompletionEventView, now: datetime) -> Consumed:
    """Make sure the release happened (a no-op unless something was lost), then hand out
    every available child of this step that nobody has dispatched yet."""
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
    children = _undispatched_children(conn, [(ev.workflow_id, ev.step)])
    ready = mark_dispatched(conn, children.get((ev.workflow_id, ev.step), ()), now)
    return Consumed(ev, "consumed", ready, tuple(changes.released + changes.cancelled))


def _undispatched_children(
    conn: Connection, parents: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], list[ReadyStep]]:
    """The available, undispatched children of each (workflow, parent), by position."""
    pairs = sorted(set(parents))
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            _UNDISPATCHED_CHILDREN_PG,
            {"b_wfs": [wid for wid, _ in pairs], "b_parents": [step for _, step in pairs]},
        )
    else:
        rows = conn.execute(_UNDISPATCHED_CHILDREN, {"parents": pairs})
    out: dict[tuple[str, str], list[ReadyStep]] = {}
    for r in rows:
        out.setdefault((r.workflow_id, r.parent), []).append(
            ReadyStep(r.workflow_id, r.name, r.queue, r.priority)
        )
    return out
