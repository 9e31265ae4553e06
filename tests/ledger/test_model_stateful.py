"""`complete_step` against the reference model in `tests.model`, on random workflows.

Hypothesis builds a random DAG (2-8 steps, edges only from earlier to later steps, random
cancel/continue policies and max_attempts 1-3), inserts it with `Workflow.insert`, then
fires random `complete_step` calls at it: any step (pending and terminal ones too), any
status, payloads from a set of three so duplicates and conflicts are common. After every
call the ledger must agree with the model, and the contract's invariants must hold on
what the ledger says by itself.

The machine is built around an engine from the usual fixtures and run with
`run_state_machine_as_test` inside an ordinary test: every example inserts new workflows
(another whenever the current one finishes, so the budget goes to live states) into the
same database, and everything read back is filtered by workflow id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import CompletionResult, Dep, InvalidCompletionError, Workflow, WorkflowRecord
from tests.model import (
    APPLIED,
    CANCEL_EDGE,
    CANCELLED,
    COMPLETED,
    CONTINUE_EDGE,
    FAILED,
    REJECTED,
    RETRYABLE,
    STATUSES,
    TERMINAL,
    Expected,
    StepPlan,
    WorkflowModel,
    cancels,
    satisfied,
)
from tests.workers import Noop

MAX_STEPS = 8
PAYLOADS: tuple[Any, ...] = ({"v": 1}, {"v": 2}, None)
#: Statuses for runnable steps, weighted so that whole workflows complete and retries
#: run out reasonably often.
FORWARD_STATUSES = (COMPLETED, RETRYABLE, COMPLETED, RETRYABLE, FAILED, CANCELLED)


@st.composite
def workflow_plans(draw: st.DrawFn) -> list[StepPlan]:
    """A random DAG: each step depends on up to three earlier steps."""
    n = draw(st.integers(2, MAX_STEPS))
    plan: list[StepPlan] = []
    for i in range(n):
        parents = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        deps = {
            f"s{p}": draw(st.sampled_from([CANCEL_EDGE, CONTINUE_EDGE])) for p in sorted(parents)
        }
        plan.append(StepPlan(f"s{i}", deps, draw(st.integers(1, 3))))
    return plan


def build(plan: list[StepPlan]) -> Workflow:
    wf = Workflow.new("model_check")
    for p in plan:
        deps = [Dep(parent, policy=policy) for parent, policy in p.deps.items()]
        wf = wf.add(p.name, Noop.new({}, max_attempts=p.max_attempts), deps=deps)
    return wf


@dataclass(frozen=True)
class Snapshot:
    """Everything the ledger holds about one workflow."""

    record: WorkflowRecord
    results: dict[str, Any]
    #: step -> number of rows in the results table
    result_rows: dict[str, int]
    #: (step, attempt, status, payload, reason), ordered
    attempts: list[tuple[str, int, str, Any, str | None]]
    #: (step, classification, status, payload), in insertion order
    evidence: list[tuple[str | None, str, str | None, Any]]


def snapshot(engine: Engine, workflow_id: str) -> Snapshot:
    record = Workflow.get(engine, workflow_id)
    results = Workflow.results(engine, workflow_id)
    r, a, e = t.results, t.attempts, t.evidence
    with engine.connect() as conn:
        result_rows: dict[str, int] = {}
        for (step,) in conn.execute(select(r.c.step).where(r.c.workflow_id == workflow_id)):
            result_rows[step] = result_rows.get(step, 0) + 1
        attempts = [
            (row.step, row.attempt, row.status, row.payload, row.reason)
            for row in conn.execute(
                select(a.c.step, a.c.attempt, a.c.status, a.c.payload, a.c.reason)
                .where(a.c.workflow_id == workflow_id)
                .order_by(a.c.step, a.c.attempt)
            )
        ]
        evidence = [
            (row.step, row.classification, row.status, row.payload)
            for row in conn.execute(
                select(e.c.step, e.c.classification, e.c.status, e.c.payload)
                .where(e.c.workflow_id == workflow_id, e.c.kind == "completion")
                .order_by(e.c.id)
            )
        ]
    return Snapshot(record, results, result_rows, attempts, evidence)


def terminal_facts(record: WorkflowRecord) -> dict[str, tuple[Any, ...]]:
    """What must never change about a terminal step (needs_review may still be set)."""
    return {
        name: (
            s.state,
            s.attempt,
            s.terminal_cause,
            s.cancelled_by_step,
            s.cancel_root_step,
            s.finished_at,
        )
        for name, s in record.steps.items()
        if s.state.value in TERMINAL
    }


class LedgerMachine(RuleBasedStateMachine):
    """One workflow at a time, a fresh one once it finished; `machine_for` binds the engine."""

    engine: ClassVar[Engine]

    def __init__(self) -> None:
        super().__init__()
        self.model: WorkflowModel | None = None
        self.workflow_id = ""
        self.ever_released: set[str] = set()
        self.previous: Snapshot | None = None
        self.current: Snapshot | None = None

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: self.model is None or self.model.finished)
    @rule(plan=workflow_plans())
    def insert(self, plan: list[StepPlan]) -> None:
        """The first workflow, and a fresh one whenever the current one has finished."""
        self.workflow_id = Workflow.insert(build(plan), self.engine).id
        self.model = WorkflowModel(plan)
        self.ever_released = {p.name for p in plan if not p.deps}
        self.current = None
        self._observe()
        self._check_against_model()

    @precondition(lambda self: self.model is not None)
    @rule(
        index=st.integers(0, MAX_STEPS - 1),
        status=st.sampled_from(STATUSES),
        payload=st.sampled_from(PAYLOADS),
    )
    def complete_any_step(self, index: int, status: str, payload: Any) -> None:
        assert self.model is not None
        self._complete(self.model.order[index % len(self.model.order)], status, payload)

    @precondition(lambda self: self.model is not None and bool(self.model.runnable()))
    @rule(
        data=st.data(), status=st.sampled_from(FORWARD_STATUSES), payload=st.sampled_from(PAYLOADS)
    )
    def complete_runnable_step(self, data: st.DataObject, status: str, payload: Any) -> None:
        """Mostly move the workflow forward, so deep states are reached too."""
        assert self.model is not None
        self._complete(data.draw(st.sampled_from(self.model.runnable())), status, payload)

    # -- one call, checked against the model -------------------------------------------------

    def _complete(self, step: str, status: str, payload: Any) -> None:
        assert self.model is not None and self.current is not None
        before = self.current
        expected = self.model.complete(step, status, payload)
        if expected.classification == REJECTED:
            with pytest.raises(InvalidCompletionError):
                Workflow.complete_step(
                    self.engine, self.workflow_id, step, status=status, payload=payload
                )
            self._observe()
            assert self.current == before, "a rejected completion wrote something"
            return
        result = Workflow.complete_step(
            self.engine, self.workflow_id, step, status=status, payload=payload
        )
        self._check_result(step, status, result, expected)
        self._observe()
        self._check_against_model()

    def _check_result(
        self, step: str, status: str, result: CompletionResult, expected: Expected
    ) -> None:
        assert result.step == step
        assert result.classification.value == expected.classification, (
            f"{step} <- {status}: ledger says {result.classification.value}, "
            f"model says {expected.classification}"
        )
        if expected.classification != APPLIED:
            assert (result.released, result.cancelled) == ((), ())
            assert result.workflow_outcome is None
            assert result.status == status
            return
        assert result.status == expected.status
        assert result.attempt == expected.attempt
        assert (result.reason == "attempts_exhausted") is expected.exhausted
        assert len(set(result.released)) == len(result.released), "released twice in one call"
        assert len(set(result.cancelled)) == len(result.cancelled)
        assert set(result.released) == expected.released
        assert set(result.cancelled) == expected.cancelled
        assert result.workflow_outcome == expected.finished_outcome
        twice = self.ever_released & set(result.released)
        assert not twice, f"released again: {sorted(twice)}"
        self.ever_released |= set(result.released)

    def _observe(self) -> None:
        self.previous = self.current
        self.current = snapshot(self.engine, self.workflow_id)

    def _check_against_model(self) -> None:
        assert self.model is not None and self.current is not None
        m, snap = self.model, self.current
        wf = snap.record
        assert {n: s.state.value for n, s in wf.steps.items()} == {
            n: s.state for n, s in m.steps.items()
        }
        assert {n: s.attempt for n, s in wf.steps.items()} == {
            n: s.attempt for n, s in m.steps.items()
        }
        assert {n: s.needs_review for n, s in wf.steps.items()} == {
            n: s.needs_review for n, s in m.steps.items()
        }
        assert wf.needs_review is m.needs_review
        assert wf.outcome == m.outcome
        assert wf.state == ("finished" if m.finished else "running")
        counters = m.counters()
        counters["runnable"] = counters.pop("available")
        assert wf.counters.as_dict() == counters
        assert snap.results == m.results()
        assert snap.attempts == sorted(
            (n, a.number, a.status, a.payload, a.reason)
            for n, s in m.steps.items()
            for a in s.attempts
        )
        assert snap.evidence == [
            (ev.step, ev.classification, ev.status, ev.payload) for ev in m.evidence
        ]
        for name, s in m.steps.items():
            rec = wf.steps[name]
            assert (rec.terminal_cause == "attempts_exhausted") is s.exhausted, name
            if s.cancel_causes:
                assert rec.cancelled_by_step in s.cancel_causes, name
                assert rec.cancel_root_step == s.cancel_root, name
            else:
                assert (rec.cancelled_by_step, rec.cancel_root_step) == (None, None), name

    # -- invariants on the ledger alone ---------------------------------------------------

    @invariant()
    def counters_match_a_recount(self) -> None:
        if self.current is None:
            return
        wf = self.current.record
        recount = dict.fromkeys(wf.counters.as_dict(), 0)
        for s in wf.steps.values():
            recount["runnable" if s.state.value == "available" else s.state.value] += 1
        assert wf.counters.as_dict() == recount

    @invariant()
    def steps_are_released_exactly_when_dependencies_allow(self) -> None:
        if self.current is None:
            return
        steps = self.current.record.steps
        for name, s in steps.items():
            deps = [(steps[p].state.value, policy.value) for p, policy in s.deps]
            ok = all(satisfied(state, policy) for state, policy in deps)
            if s.state.value in ("available", "executing"):
                assert ok, f"{name} is {s.state.value} with a dependency unsatisfied"
            if s.state.value == "pending":
                # Reconciled in the same transaction: nothing left to release or cancel.
                assert not ok, f"{name} is pending with every dependency satisfied"
                assert not any(cancels(state, pol) for state, pol in deps), (
                    f"{name} is pending behind a failed or cancelled cancel-edge dependency"
                )

    @invariant()
    def each_completed_step_has_exactly_one_result(self) -> None:
        if self.current is None:
            return
        completed = {n for n, s in self.current.record.steps.items() if s.state == "completed"}
        assert self.current.result_rows == dict.fromkeys(completed, 1)

    @invariant()
    def terminal_steps_never_change(self) -> None:
        if self.previous is None or self.current is None:
            return
        before = terminal_facts(self.previous.record)
        after = terminal_facts(self.current.record)
        assert {n: after.get(n) for n in before} == before

    @invariant()
    def outcome_is_set_iff_every_step_is_terminal(self) -> None:
        if self.current is None:
            return
        wf = self.current.record
        done = all(s.state.value in TERMINAL for s in wf.steps.values())
        assert (wf.outcome is not None) is done
        assert (wf.state == "finished") is done
        if done:
            all_completed = all(s.state == "completed" for s in wf.steps.values())
            assert wf.outcome == ("completed" if all_completed else "failed")

    @invariant()
    def cascade_causes_are_cancelling_dependencies(self) -> None:
        if self.current is None:
            return
        steps = self.current.record.steps
        for name, s in steps.items():
            if s.cancelled_by_step is None:
                continue
            assert s.state == "cancelled", name
            policy = dict(s.deps).get(s.cancelled_by_step)
            assert policy is not None, f"{name} cancelled by a step it does not depend on"
            assert cancels(steps[s.cancelled_by_step].state.value, policy.value), name


def machine_for(engine: Engine) -> type[LedgerMachine]:
    return type("BoundLedgerMachine", (LedgerMachine,), {"engine": engine})


def test_complete_step_matches_the_model_on_sqlite(sqlite_engine: Engine) -> None:
    run_state_machine_as_test(
        machine_for(sqlite_engine),
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None),
    )


@pytest.mark.postgres
def test_complete_step_matches_the_model_on_postgres(pg_engine: Engine) -> None:
    run_state_machine_as_test(
        machine_for(pg_engine),
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None),
    )


def test_replayed_exhausting_retryable_is_a_duplicate(engine: Engine) -> None:
    """Found by the machine above: a repeat of the retryable report that used up a step's
    attempts (recorded as failed) was classified ambiguous and flagged the step for review.
    It is the same event, so it is a duplicate (fixed in f3d4e48)."""
    wf = Workflow.new("replay").add("only", Noop.new({}, max_attempts=1))
    workflow_id = wf.insert(engine).id
    first = Workflow.complete_step(
        engine, workflow_id, "only", status="retryable", payload={"v": 1}
    )
    assert (first.status, first.reason) == ("failed", "attempts_exhausted")

    again = Workflow.complete_step(
        engine, workflow_id, "only", status="retryable", payload={"v": 1}
    )

    assert again.classification.value == "duplicate"
    record = Workflow.get(engine, workflow_id)
    assert not record.needs_review and not record.steps["only"].needs_review
