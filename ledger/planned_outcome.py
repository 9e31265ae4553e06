"""PostgreSQL: a finished step's outcome and the releases it causes, in one statement.

The general path (`ledger.transitions.complete_step`) writes the outcome, then reads the
step's children as they now are and releases or cancels them one by one, then moves the
counters: five or more round trips. Most outcomes need none of that machinery: the step
finished and its children either wait for other parents or are released. Holding the
workflow lock, nothing else can change those rows, so their fate can be decided from a
read made *before* the write (the finished step's own state substituted by its new one),
and the attempt row, the stored result, the step's move, the releases and the counters —
and, for the worker's hand-off, the claim of one released child — then go in as one
statement of data-modifying CTEs.

Anything more — a child cancelled by the outcome (its cascade must read its own
children), a child whose await activates or consumes a held signal — is left to the
general path: `plan_releases` answers None and nothing was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    BindParameter,
    Connection,
    String,
    Update,
    any_,
    bindparam,
    case,
    func,
    insert,
    select,
    update,
)

from ledger import direct
from ledger import tables as t
from ledger.callbacks import enqueue_callback
from ledger.changes import COUNTER_COLUMNS, Changes, WorkflowUpdate, workflow_update
from ledger.children import Child, parent_results_json
from ledger.db import hand_on_row
from ledger.model import Claim, ReadyStep
from ledger.placeholders import resolved_args
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


@dataclass(frozen=True, slots=True)
class Take:
    """The released step to claim in the same statement (the worker's hand-off)."""

    step: str
    owner: str
    lease_seconds: float


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
    take: Take | None,
    dispatch: bool,
    changes: Changes,
) -> tuple[WorkflowUpdate, Claim | None]:
    """Write the outcome, release `releases` (claiming `take` among them) and move the
    counters: one statement. Returns the counters' update and the claim of `take`.

    `changes` must already hold the step's own move; the releases are added here. With
    `dispatch`, every released step but `undispatched` (the worker's hand-off) is marked
    dispatched by the same statement. `take` (that same step, if given) goes straight
    from pending to executing, as a release then a claim would leave it.
    """
    if set(values) != set(_TERMINAL_VALUES):
        raise RuntimeError(f"a planned outcome sets {_TERMINAL_VALUES}, not {sorted(values)}")
    workflow_id = wf["id"]
    now = attempt_row["recorded_at"]
    for kid in releases:
        changes.move(StepState.PENDING, StepState.AVAILABLE)
        changes.released.append(kid.name)
        changes.ready.append(ReadyStep(workflow_id, kid.name, kid.queue, kid.priority))
    if take is not None:
        changes.move(StepState.AVAILABLE, StepState.EXECUTING)
    update_ = workflow_update(wf, changes, now)
    released = [k.name for k in releases if take is None or k.name != take.step]
    params: dict[str, Any] = {f"ba_{k}": v for k, v in attempt_row.items()}
    params.update({f"bs_{k}": v for k, v in values.items()})
    params.update(b_wf=workflow_id, b_step=step, b_expected=expected.value)
    params.update({f"bw_{k}": v for k, v in update_.values.items()})
    params.update(
        b_now=now,
        b_release=released,
        b_dispatch=[n for n in released if n != undispatched] if dispatch else [],
    )
    expires = None
    if take is not None:
        expires = now + timedelta(seconds=take.lease_seconds)
        params.update(b_take=take.step, bt_owner=take.owner, bt_expires=expires)
    statement = _STATEMENTS[(with_result, update_.outcome is not None, take is not None)]
    row = direct.first(conn, statement, params)
    if row is None or row["released"] != len(released) or (take and row["t_attempt"] is None):
        # Unreachable under the workflow lock; if it ever happens, roll back rather
        # than leave counters that disagree with the steps.
        raise RuntimeError(
            f"planned outcome of {workflow_id}/{step} did not apply as read "
            f"(step moved: {row is not None}, released: {row and row['released']} of "
            f"{len(released)}, taken: {take and row and row['t_attempt']})"
        )
    # The workflow row as the statement left it, for the next operation of a group.
    hand_on_row(conn, {**wf, **update_.values})
    if update_.outcome is not None:
        # In the transaction that records the outcome: the callback is enqueued with it.
        enqueue_callback(conn, wf, update_.outcome, update_.counts, now)
    claim = None
    if take is not None and expires is not None:
        results: dict[str, Any] = dict(row["t_parent_results"] or {})
        if with_result:  # stored by this very statement, so not in what it read
            results[step] = attempt_row["payload"]
        claim = Claim(
            workflow_id=workflow_id,
            workflow_name=wf["name"],
            step=take.step,
            attempt=row["t_attempt"],
            max_attempts=row["t_max_attempts"],
            worker=row["t_worker"],
            queue=row["t_queue"],
            args=resolved_args(row["t_args"], results),
            workflow_context=wf["context"],
            dependency_results=results,
            lease_owner=take.owner,
            lease_expires_at=expires,
            available_at=now,
        )
    return update_, claim


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


# An outcome's attempt row and stored result, as CTEs of the statement that moves the step
# (the general path's too: `ledger.transitions`).
OUTCOME_ATTEMPT = (
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
OUTCOME_RESULT = (
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


def _names(key: str) -> BindParameter[Any]:
    # An array parameter, not an expanding IN: the statement's SQL stays the same for any
    # number of names, so SQLAlchemy need not rewrite it on every execution.
    return bindparam(key, type_=ARRAY(String))


def _build(with_result: bool, finishes: bool, takes: bool) -> Update:
    released = (
        update(_s)
        .where(
            _s.c.workflow_id == bindparam("b_wf"),
            _s.c.name == any_(_names("b_release")),
            _s.c.state == StepState.PENDING.value,
        )
        .values(
            state=StepState.AVAILABLE.value,
            available_at=_NOW,
            dispatched_at=case((_s.c.name == any_(_names("b_dispatch")), _NOW), else_=None),
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
    ctes = [OUTCOME_ATTEMPT, OUTCOME_RESULT] if with_result else [OUTCOME_ATTEMPT]
    ctes += [released, counted]
    returning = [select(func.count()).select_from(released).scalar_subquery().label("released")]
    if takes:
        taken = (
            update(_s)
            .where(
                _s.c.workflow_id == bindparam("b_wf"),
                _s.c.name == bindparam("b_take"),
                _s.c.state == StepState.PENDING.value,
            )
            .values(
                state=StepState.EXECUTING.value,
                attempt=_s.c.attempt + 1,
                lease_owner=bindparam("bt_owner"),
                lease_expires_at=bindparam("bt_expires", type_=_s.c.lease_expires_at.type),
                available_at=_NOW,
                dispatched_at=None,
                updated_at=_NOW,
            )
            .returning(_s.c.attempt, _s.c.max_attempts, _s.c.worker, _s.c.queue, _s.c.args)
            .cte("taken")
        )
        ctes.append(taken)
        returning += [
            select(column).scalar_subquery().label(f"t_{column.name}") for column in taken.c
        ]
        # The other parents' stored results: committed before this statement, so its
        # snapshot sees them (the finished step's own is added by the caller).
        returning.append(
            parent_results_json(
                bindparam("b_wf"), bindparam("b_take"), but=bindparam("b_step")
            ).label("t_parent_results")
        )
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
        .returning(*returning)
    )


_STATEMENTS = {
    (wr, fin, tk): _build(wr, fin, tk)
    for wr in (False, True)
    for fin in (False, True)
    for tk in (False, True)
    if not (fin and tk)  # a step just claimed keeps its workflow running
}
