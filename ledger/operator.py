"""What an operator does to the ledger by hand: list workflows, read a workflow's timeline,
retry a failed step, and record a deliberate replay.

Plain SQL over the ledger's tables; never imports `streamflow`. Every write takes the
workflow's row lock first, like every other transition, and leaves an `operator`
evidence row saying what was done, by whom and why.

Retrying is the one place a terminal state changes again. The engine never does it; a
person does, on purpose, and the evidence keeps the failed attempt, the retry and
everything after it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, select, update

from ledger import tables as t
from ledger.blockers import Label, StepFacts, diagnose
from ledger.changes import Changes
from ledger.db import lock_workflow
from ledger.errors import LedgerError
from ledger.evidence import record_evidence
from ledger.placeholders import referenced_steps
from ledger.reads import counters_of, workflow_row
from ledger.rules import (
    DependencyView,
    EdgePolicy,
    StepState,
    decide_child,
)
from ledger.steps import step_not_found
from ledger.transitions import apply_changes, reconcile_descendants, set_step_if

WORKFLOW_STATES = ("running", "finished")
WORKFLOW_OUTCOMES = ("completed", "failed", "cancelled")

#: Control-plane labels in the order an operator should look at them.
LABEL_ORDER: tuple[Label, ...] = (
    Label.NEEDS_REVIEW,
    Label.BLOCKED,
    Label.WAITING,
    Label.RUNNABLE,
    Label.RUNNING,
    Label.CANCELLED,
    Label.DONE,
)

#: The most rows `list_workflows` returns in one call.
MAX_LIMIT = 1000


class OperatorError(LedgerError, ValueError):
    """An operator action or query that cannot be done as asked; nothing was written."""


# -- listing workflows --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowSummary:
    """One workflow as `streamflow workflows` lists it."""

    id: str
    name: str
    #: running | finished
    state: str
    outcome: str | None
    #: pending, runnable, executing, retryable, completed, failed, cancelled.
    counters: dict[str, int]
    needs_review: bool
    created_at: datetime
    finished_at: datetime | None
    #: How many steps carry each control-plane label (labels with no step left out), in
    #: `LABEL_ORDER`.
    labels: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "outcome": self.outcome,
            "counters": dict(self.counters),
            "needs_review": self.needs_review,
            "labels": dict(self.labels),
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def list_workflows(
    conn: Connection,
    *,
    state: str | None = None,
    outcome: str | None = None,
    name: str | None = None,
    older_than: timedelta | None = None,
    newer_than: timedelta | None = None,
    limit: int = 50,
    now: datetime | None = None,
) -> list[WorkflowSummary]:
    """The newest workflows matching every filter given, newest first, with step labels.

    Ages are measured from `created_at`: `older_than=1h` keeps workflows created more
    than an hour before `now`. `outcome` implies `state="finished"`.

    Each query is served by an index: `(name, created_at)` with a name, else
    `(state, created_at)` — one query per state when no state is given, merged here — so
    the cost follows `limit`, not the size of the ledger.
    """
    if state is not None and state not in WORKFLOW_STATES:
        raise OperatorError(f"unknown state {state!r}; use one of: {', '.join(WORKFLOW_STATES)}")
    if outcome is not None and outcome not in WORKFLOW_OUTCOMES:
        raise OperatorError(
            f"unknown outcome {outcome!r}; use one of: {', '.join(WORKFLOW_OUTCOMES)}"
        )
    if outcome is not None:
        if state == "running":
            raise OperatorError("a running workflow has no outcome yet; drop the state or outcome")
        state = "finished"
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise OperatorError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
    for what, age in (("older_than", older_than), ("newer_than", newer_than)):
        if age is not None and age <= timedelta(0):
            raise OperatorError(f"{what} must be a positive duration, got {age}")
    now = now or datetime.now(UTC)

    w = t.workflows
    conditions: list[Any] = []
    if name is not None:
        conditions.append(w.c.name == name)
    if outcome is not None:
        conditions.append(w.c.outcome == outcome)
    if older_than is not None:
        conditions.append(w.c.created_at < now - older_than)
    if newer_than is not None:
        conditions.append(w.c.created_at >= now - newer_than)

    def newest(*extra: Any) -> list[dict[str, Any]]:
        query = (
            select(w)
            .where(*conditions, *extra)
            .order_by(w.c.created_at.desc(), w.c.id.desc())
            .limit(limit)
        )
        return [dict(r) for r in conn.execute(query).mappings()]

    if state is not None or name is not None:
        rows = newest(*([w.c.state == state] if state is not None else []))
    else:
        rows = [r for s in WORKFLOW_STATES for r in newest(w.c.state == s)]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        rows = rows[:limit]

    labels = label_counts(conn, [r["id"] for r in rows])
    return [
        WorkflowSummary(
            id=r["id"],
            name=r["name"],
            state=r["state"],
            outcome=r["outcome"],
            counters=counters_of(r).as_dict(),
            needs_review=r["needs_review"],
            created_at=r["created_at"],
            finished_at=r["finished_at"],
            labels=labels.get(r["id"], {}),
        )
        for r in rows
    ]


def label_counts(conn: Connection, workflow_ids: list[str]) -> dict[str, dict[str, int]]:
    """`{workflow_id: {label: steps}}` for the given workflows, with four queries.

    Each step is labelled by `ledger.blockers.diagnose`, the function `explain` and
    `status` use, so the counts agree with what they show step by step.
    """
    if not workflow_ids:
        return {}
    s, e, r = t.steps, t.edges, t.results
    steps: dict[tuple[str, str], dict[str, Any]] = {
        (row["workflow_id"], row["name"]): dict(row)
        for row in conn.execute(
            select(
                s.c.workflow_id,
                s.c.name,
                s.c.state,
                s.c.needs_review,
                s.c.terminal_cause,
                s.c.cancelled_by_step,
                s.c.cancel_root_step,
                s.c.args,
            ).where(s.c.workflow_id.in_(workflow_ids))
        ).mappings()
    }
    deps: dict[tuple[str, str], list[tuple[str, EdgePolicy]]] = {}
    for edge in conn.execute(
        select(e.c.workflow_id, e.c.child, e.c.parent, e.c.policy).where(
            e.c.workflow_id.in_(workflow_ids)
        )
    ):
        deps.setdefault((edge.workflow_id, edge.child), []).append(
            (edge.parent, EdgePolicy(edge.policy))
        )
    with_results = {
        (row.workflow_id, row.step)
        for row in conn.execute(
            select(r.c.workflow_id, r.c.step).where(r.c.workflow_id.in_(workflow_ids))
        )
    }
    # Steps still waiting for their signal, and whether that wait is active yet.
    a = t.awaits
    awaiting: dict[tuple[str, str], tuple[str, bool]] = {
        (row.workflow_id, row.step): (row.signal, row.state == "waiting")
        for row in conn.execute(
            select(a.c.workflow_id, a.c.step, a.c.signal, a.c.state).where(
                a.c.workflow_id.in_(workflow_ids),
                a.c.state.in_(("pending", "waiting")),
                a.c.signal_id.is_(None),
            )
        )
    }
    counts: dict[str, Counter[Label]] = {wid: Counter() for wid in workflow_ids}
    for (wid, name), row in steps.items():
        signal, active = awaiting.get((wid, name), (None, False))
        facts = StepFacts(
            state=StepState(row["state"]),
            needs_review=row["needs_review"],
            terminal_cause=row["terminal_cause"],
            cancelled_by_step=row["cancelled_by_step"],
            cancel_root_step=row["cancel_root_step"],
            deps=[
                (
                    DependencyView(parent, StepState(steps[(wid, parent)]["state"]), policy),
                    (wid, parent) in with_results,
                )
                for parent, policy in deps.get((wid, name), [])
            ],
            referenced=frozenset(referenced_steps(row["args"])),
            awaiting_signal=signal,
            await_active=active,
        )
        counts[wid][diagnose(facts).label] += 1
    return {
        wid: {label.value: c[label] for label in LABEL_ORDER if c[label]}
        for wid, c in counts.items()
    }


# -- the timeline ---------------------------------------------------------------------------------

#: Entries recorded at the same instant are shown in the order they were made.
#: A workflow's creation comes before anything at its instant, its finish after everything.
_RANK = {
    "inserted": 0,
    "cancel_request": 1,
    "signal": 2,
    "attempt": 3,
    "evidence": 4,
    "recovery": 5,
    "callback": 6,
    "finished": 7,
}


def _table(name: str) -> Table | None:
    """A table looked up by name: signals and callbacks arrive with a later migration, and
    the timeline includes them whenever the ledger has them."""
    return t.metadata.tables.get(name)


def _rest(row: Any, *skip: str) -> dict[str, Any]:
    """The row's columns except `skip` and the workflow id, for an entry's detail."""
    return {k: v for k, v in row.items() if k not in (*skip, "workflow_id")}


def evidence_timeline(
    conn: Connection, workflow_id: str, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """Everything on record about a workflow, oldest first, as plain dicts.

    Merges the workflow's creation and finish, cancel requests, signals, applied outcomes
    (attempt rows), evidence (every event that did not simply apply: duplicates, late,
    ambiguous, unmatched, dropped and consumed events, deliveries, operator actions), the
    reconciler's recoveries and the `on_finish` callback's enqueue and deliveries (when
    the ledger has those tables). Each entry has the same keys:

    `when` (aware UTC datetime), `kind` (`workflow`, `cancel_request`, `signal`,
    `attempt`, `recovery`, `callback`, or the evidence row's own kind: `completion`,
    `event`, `delivery`, `operator`, ...), `classification` (for evidence and signals
    their classification; for a recovery the repair; for an attempt or callback delivery
    `applied`; `inserted`/`finished`/`requested`/`enqueued` otherwise), `step`,
    `attempt`, `status`, `source`, `reason` and `detail` (a dict of the row's remaining
    fields).

    With `limit`, only the latest `limit` entries are returned (still oldest first).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OperatorError(f"limit must be a positive whole number, got {limit!r}")
    wf = workflow_row(conn, workflow_id)
    entries: list[tuple[tuple[datetime, int, int], dict[str, Any]]] = []

    def add(kind: str, order: int, entry: dict[str, Any]) -> None:
        base: dict[str, Any] = {
            "when": None,
            "kind": kind,
            "classification": None,
            "step": None,
            "attempt": None,
            "status": None,
            "source": None,
            "reason": None,
            "detail": {},
        }
        base.update(entry)
        rank = _RANK[base["classification"] if kind == "workflow" else kind]
        entries.append(((base["when"], rank, order), base))

    def newest_first(query: Any, *order: Any) -> Any:
        query = query.order_by(*(c.desc() for c in order))
        return query.limit(limit) if limit is not None else query

    add(
        "workflow",
        0,
        {
            "when": wf["created_at"],
            "classification": "inserted",
            "detail": {"name": wf["name"], "steps": wf["step_count"]},
        },
    )
    if wf["finished_at"] is not None:
        add(
            "workflow",
            1,
            {
                "when": wf["finished_at"],
                "classification": "finished",
                "status": wf["outcome"],
                "detail": {"outcome": wf["outcome"], "counters": counters_of(wf).as_dict()},
            },
        )

    c = t.cancel_requests
    for row in conn.execute(
        newest_first(select(c).where(c.c.workflow_id == workflow_id), c.c.id)
    ).mappings():
        add(
            "cancel_request",
            row["id"],
            {
                "when": row["created_at"],
                "classification": "requested",
                "source": row["requested_by"],
                "reason": row["reason"],
                "detail": _rest(row, "created_at", "requested_by", "reason"),
            },
        )

    signals = _table("streamflow_signals")
    if signals is not None:
        sg = signals.c
        for row in conn.execute(
            newest_first(select(signals).where(sg.workflow_id == workflow_id), sg.id)
        ).mappings():
            add(
                "signal",
                row["id"],
                {
                    "when": row["created_at"],
                    "classification": row["classification"],
                    "step": row["step"],
                    "source": row["source"],
                    "reason": row["reason"],
                    "detail": _rest(
                        row, "created_at", "classification", "step", "source", "reason"
                    ),
                },
            )

    a = t.attempts
    for row in conn.execute(
        newest_first(select(a).where(a.c.workflow_id == workflow_id), a.c.recorded_at)
    ).mappings():
        add(
            "attempt",
            row["attempt"],
            {
                "when": row["recorded_at"],
                "classification": "applied",
                "step": row["step"],
                "attempt": row["attempt"],
                "status": row["status"],
                "source": row["source"],
                "reason": row["reason"],
                "detail": {"payload": row["payload"]},
            },
        )

    e = t.evidence
    for row in conn.execute(
        newest_first(select(e).where(e.c.workflow_id == workflow_id), e.c.id)
    ).mappings():
        detail: dict[str, Any] = {"id": row["id"]}
        if row["payload"] is not None:
            detail["payload"] = row["payload"]
        if row["dedupe_key"] is not None:
            detail["dedupe_key"] = row["dedupe_key"]
        entries.append(
            (
                (row["created_at"], _RANK["evidence"], row["id"]),
                {
                    "when": row["created_at"],
                    "kind": row["kind"],
                    "classification": row["classification"],
                    "step": row["step"],
                    "attempt": row["attempt"],
                    "status": row["status"],
                    "source": row["source"],
                    "reason": row["reason"],
                    "detail": detail,
                },
            )
        )

    r = t.recoveries
    for row in conn.execute(
        newest_first(select(r).where(r.c.workflow_id == workflow_id), r.c.id)
    ).mappings():
        add(
            "recovery",
            row["id"],
            {
                "when": row["created_at"],
                "classification": row["repair"],
                "step": row["step"],
                "source": "reconciler" if row["pass_id"] is not None else "engine",
                "reason": row["reason"],
                "detail": {
                    "id": row["id"],
                    "pass_id": row["pass_id"],
                    "evidence": row["evidence"],
                },
            },
        )

    callbacks = _table("streamflow_callbacks")
    if callbacks is not None:
        enqueued = (
            conn.execute(select(callbacks).where(callbacks.c.workflow_id == workflow_id))
            .mappings()
            .first()
        )
        if enqueued is not None:
            add(
                "callback",
                0,
                {
                    "when": enqueued["created_at"],
                    "classification": "enqueued",
                    "source": "ledger",
                    "detail": {
                        k: enqueued[k]
                        for k in ("worker", "queue", "state", "workflow_outcome")
                        if k in enqueued
                    },
                },
            )
    deliveries = _table("streamflow_callback_attempts")
    if deliveries is not None:
        cd = deliveries.c
        for row in conn.execute(
            newest_first(select(deliveries).where(cd.workflow_id == workflow_id), cd.recorded_at)
        ).mappings():
            add(
                "callback",
                row["attempt"],
                {
                    "when": row["recorded_at"],
                    "classification": "applied",
                    "attempt": row["attempt"],
                    "status": row["status"],
                    "source": row["source"],
                    "reason": row["reason"],
                    "detail": _rest(row, "recorded_at", "attempt", "status", "source", "reason"),
                },
            )

    entries.sort(key=lambda pair: pair[0])
    ordered = [entry for _, entry in entries]
    return ordered[-limit:] if limit is not None else ordered


# -- retrying a failed step -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryResult:
    workflow_id: str
    step: str
    #: The failed attempt the retry follows; the next claim runs `failed_attempt + 1`.
    failed_attempt: int
    max_attempts_before: int
    max_attempts: int
    #: Descendants the failure had cascade-cancelled, back to `pending`.
    restored: tuple[str, ...]
    #: Of those, the ones cancelled again at once because another dependency still
    #: cancels them (its own failure is the cause recorded now).
    recancelled: tuple[str, ...]
    #: True when the workflow had finished and is running again.
    reopened: bool

    @property
    def next_attempt(self) -> int:
        return self.failed_attempt + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "step": self.step,
            "state": StepState.AVAILABLE.value,
            "failed_attempt": self.failed_attempt,
            "next_attempt": self.next_attempt,
            "max_attempts_before": self.max_attempts_before,
            "max_attempts": self.max_attempts,
            "restored": list(self.restored),
            "recancelled": list(self.recancelled),
            "workflow_reopened": self.reopened,
        }


def retry_step(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    reason: str | None,
    now: datetime,
    source: str = "operator",
) -> RetryResult:
    """An operator sends a `failed` step round again.

    In one transaction, under the workflow lock:

    - the step goes `failed` -> `available`, undispatched (the dispatcher sends it), with
      its terminal cause, finish time and schedule cleared. Its attempt count stays (the
      next claim runs attempt N+1; history keeps attempt N as failed). Its budget is
      extended only as far as needed: `max_attempts = max(max_attempts, attempt + 1)`,
      so a step that exhausted its attempts gets exactly one more, and a step that failed
      outright with attempts left keeps the ones it had;
    - every step the failure cascade-cancelled (`cancel_root_step` = this step,
      `terminal_cause = cancelled_by_dependency`) goes back to `pending`. If another
      dependency of one of them still cancels it (a second failure), it is cancelled
      again at once with that cause, through the same rule every path uses;
    - the counters move with the steps; a finished workflow is `running` again and its
      outcome cleared;
    - an evidence row (`kind = operator`, `classification = retried`) keeps who, why,
      the attempt that failed, the budget change and the steps restored.

    Refused (`OperatorError`, nothing written) for a step that is not `failed` and for a
    workflow with a cancel request. `needs_review` flags stay as they were: ambiguous
    reports are still on record and still want a person's look.
    """
    wf = lock_workflow(conn, workflow_id)
    s = t.steps
    row = (
        conn.execute(select(s).where(s.c.workflow_id == workflow_id, s.c.name == step))
        .mappings()
        .first()
    )
    if row is None:
        raise step_not_found(conn, workflow_id, step)
    state = StepState(row["state"])
    if state is not StepState.FAILED:
        raise OperatorError(_not_retryable(step, state, row))
    cancel = conn.execute(
        select(t.cancel_requests.c.id).where(t.cancel_requests.c.workflow_id == workflow_id)
    ).first()
    if cancel is not None:
        raise OperatorError(
            f"workflow {workflow_id!r} has a cancel request; a cancelled workflow is not "
            "retried (insert a new one instead)"
        )

    changes = Changes()
    failed_attempt: int = row["attempt"]
    before: int = row["max_attempts"]
    budget = max(before, failed_attempt + 1)
    set_step_if(
        conn,
        workflow_id,
        step,
        StepState.FAILED,
        {
            "state": StepState.AVAILABLE.value,
            "max_attempts": budget,
            "terminal_cause": None,
            "finished_at": None,
            "scheduled_at": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "available_at": now,
            "dispatched_at": None,
            "updated_at": now,
        },
    )
    changes.move(StepState.FAILED, StepState.AVAILABLE)

    cascaded = (
        s.c.workflow_id == workflow_id,
        s.c.state == StepState.CANCELLED.value,
        s.c.terminal_cause == "cancelled_by_dependency",
        s.c.cancel_root_step == step,
    )
    restored = (
        conn.execute(select(s.c.name).where(*cascaded).order_by(s.c.position)).scalars().all()
    )
    if restored:
        conn.execute(
            update(s)
            .where(*cascaded)
            .values(
                state=StepState.PENDING.value,
                terminal_cause=None,
                cancelled_by_step=None,
                cancel_root_step=None,
                finished_at=None,
                updated_at=now,
            )
        )
    for _ in restored:
        changes.move(StepState.CANCELLED, StepState.PENDING)
    _decide_restored(conn, workflow_id, list(restored), changes, now)

    apply_changes(conn, wf, changes, now)
    reopened = wf["state"] == "finished"
    conn.execute(
        update(t.workflows)
        .where(t.workflows.c.id == workflow_id)
        .values(state="running", outcome=None, finished_at=None, updated_at=now)
    )
    names = tuple(restored)
    recancelled = tuple(n for n in names if n in changes.cancelled)
    record_evidence(
        conn,
        workflow_id=workflow_id,
        step=step,
        kind="operator",
        classification="retried",
        source=source,
        now=now,
        status=StepState.FAILED.value,
        attempt=failed_attempt,
        payload={
            "reason": reason,
            "max_attempts": {"before": before, "after": budget},
            "restored": list(names),
            "recancelled": list(recancelled),
            "workflow_reopened": reopened,
            "previous_outcome": wf["outcome"],
        },
        reason="operator_retry",
    )
    return RetryResult(
        workflow_id=workflow_id,
        step=step,
        failed_attempt=failed_attempt,
        max_attempts_before=before,
        max_attempts=budget,
        restored=names,
        recancelled=recancelled,
        reopened=reopened,
    )


def _not_retryable(step: str, state: StepState, row: Any) -> str:
    if state is StepState.CANCELLED and row["terminal_cause"] == "cancelled_by_dependency":
        return (
            f"step {step!r} is cancelled, not failed: it was cascade-cancelled because "
            f"{row['cancel_root_step']!r} failed; retry {row['cancel_root_step']!r} instead"
        )
    if state in (StepState.COMPLETED, StepState.CANCELLED):
        return f"step {step!r} is {state.value}, not failed; only a failed step can be retried"
    return (
        f"step {step!r} is {state.value}, not failed: it has not finished, so there is "
        "nothing to retry"
    )


def _decide_restored(
    conn: Connection, workflow_id: str, names: list[str], changes: Changes, now: datetime
) -> None:
    """Put each restored step through the one release/cancel rule, with today's states.

    Normally each waits again (the retried step is not finished). One whose other
    dependency failed or was cancelled through a cancel edge is cancelled again, with
    that cause, and `reconcile_descendants` carries the cascade on from it.
    """
    e, s, p = t.edges, t.steps, t.steps.alias("p")
    for name in names:
        current = conn.execute(
            select(s.c.state).where(s.c.workflow_id == workflow_id, s.c.name == name)
        ).scalar_one()
        if current != StepState.PENDING.value:
            continue  # cancelled again already, through a restored parent
        deps = conn.execute(
            select(e.c.parent, e.c.policy, p.c.state, p.c.terminal_cause, p.c.cancel_root_step)
            .join(p, (p.c.workflow_id == e.c.workflow_id) & (p.c.name == e.c.parent))
            .where(e.c.workflow_id == workflow_id, e.c.child == name)
            .order_by(p.c.position)
        ).all()
        decision = decide_child(
            [DependencyView(d.parent, StepState(d.state), EdgePolicy(d.policy)) for d in deps]
        )
        if decision.kind == "cancel":
            cause = next(d for d in deps if d.parent == decision.cause)
            root = (
                cause.cancel_root_step
                if cause.terminal_cause == "cancelled_by_dependency"
                else cause.parent
            )
            set_step_if(
                conn,
                workflow_id,
                name,
                StepState.PENDING,
                {
                    "state": StepState.CANCELLED.value,
                    "terminal_cause": "cancelled_by_dependency",
                    "cancelled_by_step": cause.parent,
                    "cancel_root_step": root,
                    "finished_at": now,
                    "updated_at": now,
                },
            )
            changes.move(StepState.PENDING, StepState.CANCELLED)
            changes.cancelled.append(name)
            reconcile_descendants(conn, workflow_id, [name], changes, now)
        elif decision.kind == "release":
            set_step_if(
                conn,
                workflow_id,
                name,
                StepState.PENDING,
                {
                    "state": StepState.AVAILABLE.value,
                    "available_at": now,
                    "dispatched_at": None,
                    "updated_at": now,
                },
            )
            changes.move(StepState.PENDING, StepState.AVAILABLE)
            changes.released.append(name)


# -- replaying a completion event ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayTarget:
    """A recorded outcome to publish again, as its completion event had it."""

    workflow_id: str
    step: str
    attempt: int
    #: The status recorded for that attempt.
    status: str
    recorded_at: datetime

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}:{self.step}:{self.attempt}:{self.status}"


def record_replay(
    conn: Connection,
    workflow_id: str,
    step: str,
    *,
    attempt: int | None = None,
    reason: str | None = None,
    now: datetime,
    source: str = "operator",
) -> ReplayTarget:
    """Record (`kind = operator`, `classification = replayed`) that an operator is about to
    publish a step's completion event again, and return what to publish.

    The event is the one the recorded outcome of `attempt` (default: the step's latest
    recorded outcome) produced: same attempt, status and idempotency key. Nothing else
    changes; the consumer that receives it classifies the delivery itself (`duplicate`
    when the original was consumed). Refused (`OperatorError`) when the step has no
    recorded outcome for that attempt.
    """
    if attempt is not None and (isinstance(attempt, bool) or attempt < 1):
        raise OperatorError(f"attempt must be a positive whole number, got {attempt!r}")
    lock_workflow(conn, workflow_id)
    s, a = t.steps, t.attempts
    state = conn.execute(
        select(s.c.state).where(s.c.workflow_id == workflow_id, s.c.name == step)
    ).scalar()
    if state is None:
        raise step_not_found(conn, workflow_id, step)
    recorded = {
        r.attempt: r
        for r in conn.execute(
            select(a.c.attempt, a.c.status, a.c.recorded_at).where(
                a.c.workflow_id == workflow_id, a.c.step == step
            )
        )
    }
    if not recorded:
        raise OperatorError(
            f"step {step!r} has no recorded outcome to replay (it is {state}); only an "
            "outcome recorded for an attempt has a completion event"
        )
    chosen = max(recorded) if attempt is None else attempt
    if chosen not in recorded:
        known = ", ".join(str(n) for n in sorted(recorded))
        raise OperatorError(
            f"step {step!r} has no recorded outcome for attempt {chosen} (recorded: {known})"
        )
    row = recorded[chosen]
    target = ReplayTarget(workflow_id, step, row.attempt, row.status, row.recorded_at)
    record_evidence(
        conn,
        workflow_id=workflow_id,
        step=step,
        kind="operator",
        classification="replayed",
        source=source,
        now=now,
        status=target.status,
        attempt=target.attempt,
        payload={"reason": reason} if reason else None,
        reason="operator_replay",
        dedupe_key=target.idempotency_key,
    )
    return target
