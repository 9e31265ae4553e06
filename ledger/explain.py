"""`explain`: read the facts about one step and diagnose them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from ledger import tables as t
from ledger.blockers import Blocker, Label, StepFacts, diagnose
from ledger.placeholders import referenced_steps
from ledger.reads import workflow_row
from ledger.rules import DependencyView, EdgePolicy, StepState, dependency_satisfied
from ledger.steps import step_not_found


@dataclass(frozen=True, slots=True)
class DependencySnapshot:
    step: str
    state: str
    policy: str
    satisfied: bool
    has_result: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "state": self.state,
            "policy": self.policy,
            "satisfied": self.satisfied,
            "has_result": self.has_result,
        }


@dataclass(frozen=True, slots=True)
class StepExplanation:
    workflow_id: str
    workflow_name: str
    workflow_state: str
    workflow_outcome: str | None
    step: str
    #: The raw step state.
    state: str
    #: The operator label: Runnable, Running, Waiting, Blocked, Needs Review, Done, Cancelled.
    label: str
    blocker_codes: list[str]
    #: One human sentence saying why.
    reason: str
    dependencies: list[DependencySnapshot]
    attempt: int
    max_attempts: int
    needs_review: bool
    terminal_cause: str | None
    cancelled_by_step: str | None
    cancel_root_step: str | None
    scheduled_at: datetime | None
    #: For a step that awaits a signal: its name, the await's state (pending, waiting,
    #: satisfied, expired, cancelled) and, once active, its deadline.
    await_signal: str | None = None
    await_state: str | None = None
    signal_deadline_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "workflow_name": self.workflow_name,
            "workflow_state": self.workflow_state,
            "workflow_outcome": self.workflow_outcome,
            "step": self.step,
            "state": self.state,
            "label": self.label,
            "blocker_codes": list(self.blocker_codes),
            "reason": self.reason,
            "dependencies": [d.to_dict() for d in self.dependencies],
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "needs_review": self.needs_review,
            "terminal_cause": self.terminal_cause,
            "cancelled_by_step": self.cancelled_by_step,
            "cancel_root_step": self.cancel_root_step,
            "scheduled_at": self.scheduled_at.isoformat() if self.scheduled_at else None,
            "await_signal": self.await_signal,
            "await_state": self.await_state,
            "signal_deadline_at": (
                self.signal_deadline_at.isoformat() if self.signal_deadline_at else None
            ),
        }


def explain_step(conn: Connection, workflow_id: str, step: str) -> StepExplanation:
    w = workflow_row(conn, workflow_id)
    s, e, r = t.steps, t.edges, t.results
    row = (
        conn.execute(select(s).where(s.c.workflow_id == workflow_id, s.c.name == step))
        .mappings()
        .first()
    )
    if row is None:
        raise step_not_found(conn, workflow_id, step)

    p = s.alias("p")
    dep_rows = conn.execute(
        select(e.c.parent, e.c.policy, p.c.state, r.c.step.label("result_step"))
        .join(p, (p.c.workflow_id == e.c.workflow_id) & (p.c.name == e.c.parent))
        .outerjoin(r, (r.c.workflow_id == e.c.workflow_id) & (r.c.step == e.c.parent))
        .where(e.c.workflow_id == workflow_id, e.c.child == step)
        .order_by(p.c.position)
    ).all()
    deps = [
        (
            DependencyView(d.parent, StepState(d.state), EdgePolicy(d.policy)),
            d.result_step is not None,
        )
        for d in dep_rows
    ]
    a, sg = t.awaits, t.signals
    awaiting = conn.execute(
        select(a.c.signal, a.c.state, a.c.signal_id, a.c.deadline_at).where(
            a.c.workflow_id == workflow_id, a.c.step == step
        )
    ).first()
    ambiguous_signal = (
        awaiting is not None
        and conn.execute(
            select(sg.c.id)
            .where(
                sg.c.workflow_id == workflow_id,
                sg.c.step == step,
                sg.c.classification == "ambiguous",
            )
            .limit(1)
        ).first()
        is not None
    )
    still_awaiting = (
        awaiting is not None
        and awaiting.signal_id is None
        and awaiting.state in ("pending", "waiting")
    )
    diagnosis = diagnose(
        StepFacts(
            state=StepState(row["state"]),
            needs_review=row["needs_review"],
            terminal_cause=row["terminal_cause"],
            cancelled_by_step=row["cancelled_by_step"],
            cancel_root_step=row["cancel_root_step"],
            deps=deps,
            referenced=frozenset(referenced_steps(row["args"])),
            awaiting_signal=awaiting.signal if still_awaiting and awaiting else None,
            await_active=awaiting is not None and awaiting.state == "waiting",
            signal_deadline_at=awaiting.deadline_at if awaiting else None,
            ambiguous_signal=ambiguous_signal,
        )
    )
    return StepExplanation(
        workflow_id=workflow_id,
        workflow_name=w["name"],
        workflow_state=w["state"],
        workflow_outcome=w["outcome"],
        step=step,
        state=row["state"],
        label=Label(diagnosis.label).value,
        blocker_codes=[Blocker(b).value for b in diagnosis.blockers],
        reason=diagnosis.reason,
        dependencies=[
            DependencySnapshot(
                d.step, d.state.value, d.policy.value, dependency_satisfied(d.state, d.policy), has
            )
            for d, has in deps
        ],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        needs_review=row["needs_review"],
        terminal_cause=row["terminal_cause"],
        cancelled_by_step=row["cancelled_by_step"],
        cancel_root_step=row["cancel_root_step"],
        scheduled_at=row["scheduled_at"],
        await_signal=awaiting.signal if awaiting else None,
        await_state=awaiting.state if awaiting else None,
        signal_deadline_at=awaiting.deadline_at if awaiting else None,
    )
