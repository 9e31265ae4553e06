"""PostgreSQL: a finished step's outcome and the releases it causes, in one statement.

The general path (`ledger.transitions.complete_step`) writes the outcome, then reads the
step's children as they now are and releases or cancels them one by one, then moves the
counters: five or more round trips. Most outcomes need none of that machinery: the step
finished and its children either wait for other parents or are released. Holding the
workflow lock, nothing else can change those rows, so their fate can be decided from a
read made *before* the write (the finished step's own state substituted by its new one),
and the attempt row, the stored result, the step's move, the releases and the counters
then go in as one statement of data-modifying CTEs.

Anything more — a child cancelled by the outcome (its cascade must read its own
children), a child whose await activates or consumes a held signal — is left to the
general path: `plan_releases` answers None and nothing was written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Update, bindparam, case, func, insert, select, update

from ledger import tables as t
from ledger.callbacks import enqueue_callback
from ledger.changes import COUNTER_COLUMNS, Changes, WorkflowUpdate, workflow_update
from ledger.children import Child
from ledger.model import ReadyStep
from ledger.rules import DependencyView, StepState


def plan_releases(children: list[Child], step: str, new_state: StepState) -> list[Child] | None:
    """The children `step` releases by becoming `new_state` (terminal), from `children`
    as read before the outcome is written; None if any needs more than a plain release.

    The caller read them holding the workflow lock, so they are what the write will find;
    only `step`'s own state is about to change, and is substituted.
    """
    releases = []
    for kid in children:
        if kid.state is not StepState.PENDING:
            continue
        kid.deps = [
            (DependencyView(d.step, new_state, d.policy), root) if d.step == step else (d, root)
            for d, root in kid.deps
        ]
        decision = kid.decide()
        if decision.kind == "wait":
            continue
        if decision.kind == "release" and kid.await_state is None:
            releases.append(kid)
            continue
        return None  # a cancel cascade or an await: the general path
    return releases


def write_planned_outcome(
    conn: Connection,
    wf: dict[str, Any],
    step: str,
    expected: StepState,
    *,
    attempt_row: dict[str, Any],
    with_result: bool,
    values: dict[str, Any],
    releases: list[Child],
    undispatched: str | None,
    dispatch: bool,
    changes: Changes,
) -> WorkflowUpdate:
    """Write the outcome, release `releases` and move the counters: one statement.

    `changes` must already hold the step's own move; the releases are added here. With
    `dispatch`, every released step but `undispatched` (the worker's hand-off) is marked
    dispatched by the same statement.
    """
    if set(values) != set(_TERMINAL_VALUES):
        raise RuntimeError(f"a planned outcome sets {_TERMINAL_VALUES}, not {sorted(values)}")
    workflow_id = wf["id"]
    now = attempt_row["recorded_at"]
    for kid in releases:
        changes.move(StepState.PENDING, StepState.AVAILABLE)
        changes.released.append(kid.name)
        changes.ready.append(ReadyStep(workflow_id, kid.name, kid.queue, kid.priority))
    update_ = workflow_update(wf, changes, now)
    released = [k.name for k in releases]
    params: dict[str, Any] = {f"ba_{k}": v for k, v in attempt_row.items()}
    params.update({f"bs_{k}": v for k, v in values.items()})
    params.update(b_wf=workflow_id, b_step=step, b_expected=expected.value)
    params.update({f"bw_{k}": v for k, v in update_.values.items()})
    params.update(
        b_now=now,
        b_release=released,
        b_dispatch=[n for n in released if n != undispatched] if dispatch else [],
    )
    statement = _STATEMENTS[(with_result, update_.outcome is not None)]
    row = conn.execute(statement, params).first()
    if row is None or row.released != len(released):
        # Unreachable under the workflow lock; if it ever happens, roll back rather
        # than leave counters that disagree with the steps.
        raise RuntimeError(
            f"planned outcome of {workflow_id}/{step} did not apply as read "
            f"(step moved: {row is not None}, released: {row and row.released} of "
            f"{len(released)})"
        )
    if update_.outcome is not None:
        # In the transaction that records the outcome: the callback is enqueued with it.
        enqueue_callback(conn, wf, update_.outcome, update_.counts, now)
    return update_


# -- the statement, built once per variant ------------------------------------------------

_s, _a, _r, _w = t.steps, t.attempts, t.results, t.workflows
_NOW = bindparam("b_now", type_=_s.c.updated_at.type)
#: What `ledger.transitions.outcome_values` sets on a step that became terminal.
_TERMINAL_VALUES = (
    "state",
    "attempt",
    "updated_at",
    "lease_owner",
    "lease_expires_at",
    "terminal_cause",
    "finished_at",
    "scheduled_at",
)


def _build(with_result: bool, finishes: bool) -> Update:
    attempt = (
        insert(_a)
        .values(
            workflow_id=bindparam("b_wf"),
            step=bindparam("b_step"),
            **{
                c: bindparam(f"ba_{c}")
                for c in ("attempt", "status", "payload", "reason", "source", "recorded_at")
            },
        )
        .returning(_a.c.attempt)
        .cte("outcome_attempt")
    )
    result = (
        insert(_r)
        .values(
            workflow_id=bindparam("b_wf"),
            step=bindparam("b_step"),
            attempt=bindparam("ba_attempt"),
            payload=bindparam("ba_payload"),
            recorded_at=bindparam("ba_recorded_at"),
        )
        .returning(_r.c.attempt)
        .cte("outcome_result")
    )
    released = (
        update(_s)
        .where(
            _s.c.workflow_id == bindparam("b_wf"),
            _s.c.name.in_(bindparam("b_release", expanding=True)),
            _s.c.state == StepState.PENDING.value,
        )
        .values(
            state=StepState.AVAILABLE.value,
            available_at=_NOW,
            dispatched_at=case(
                (_s.c.name.in_(bindparam("b_dispatch", expanding=True)), _NOW), else_=None
            ),
            updated_at=_NOW,
        )
        .returning(_s.c.name)
        .cte("released")
    )
    columns = [*COUNTER_COLUMNS.values(), "updated_at"]
    if finishes:
        columns += ["state", "outcome", "finished_at"]
    counted = (
        update(_w)
        .where(_w.c.id == bindparam("b_wf"))
        .values({c: bindparam(f"bw_{c}") for c in columns})
        .returning(_w.c.id)
        .cte("counted")
    )
    ctes = (attempt, result, released, counted) if with_result else (attempt, released, counted)
    # The step's own move is the statement. Every parameter has a prefix: SQLAlchemy
    # would add a parameter named like a column to the SET of each UPDATE of its table.
    return (
        update(_s)
        .where(
            _s.c.workflow_id == bindparam("b_wf"),
            _s.c.name == bindparam("b_step"),
            _s.c.state == bindparam("b_expected"),
        )
        .values({c: bindparam(f"bs_{c}") for c in _TERMINAL_VALUES})
        .add_cte(*ctes)
        .returning(select(func.count()).select_from(released).scalar_subquery().label("released"))
    )


_STATEMENTS = {(wr, fin): _build(wr, fin) for wr in (False, True) for fin in (False, True)}
