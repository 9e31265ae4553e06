"""Why a step is where it is: blocker codes, the operator label and a one-line reason.

Pure: takes the facts `ledger.explain` read and returns words. Every code is documented
in docs/explain.md; add a row there when you add one here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ledger.rules import (
    DependencyView,
    StepState,
    decide_child,
    dependency_satisfied,
)


class Label(enum.StrEnum):
    RUNNABLE = "Runnable"
    RUNNING = "Running"
    WAITING = "Waiting"
    BLOCKED = "Blocked"
    NEEDS_REVIEW = "Needs Review"
    DONE = "Done"
    CANCELLED = "Cancelled"


class Blocker(enum.StrEnum):
    WAITING_ON_DEPENDENCIES = "waiting_on_dependencies"
    WAITING_ON_RETRYABLE_DEPENDENCY = "waiting_on_retryable_dependency"
    MISSING_DEPENDENCY_RESULT = "missing_dependency_result"
    CANCELLED_BY_DEPENDENCY = "cancelled_by_dependency"
    RETRY_SCHEDULED = "retry_scheduled"
    RELEASE_NOT_APPLIED = "release_not_applied"
    CANCEL_NOT_APPLIED = "cancel_not_applied"
    AMBIGUOUS_OUTCOME = "ambiguous_outcome"
    STEP_FAILED = "step_failed"
    AWAITING_SIGNAL = "awaiting_signal"
    AMBIGUOUS_SIGNAL = "ambiguous_signal"


@dataclass(frozen=True, slots=True)
class StepFacts:
    state: StepState
    needs_review: bool
    terminal_cause: str | None
    cancelled_by_step: str | None
    cancel_root_step: str | None
    #: Each dependency with whether a result is stored for it.
    deps: Sequence[tuple[DependencyView, bool]]
    #: Dependencies whose result the step's args use through placeholders.
    referenced: frozenset[str]
    #: The signal the step still waits for (None: it awaits none, or it arrived).
    awaiting_signal: str | None = None
    #: True once its await is active (dependencies satisfied, the deadline running).
    await_active: bool = False
    signal_deadline_at: datetime | None = None
    #: A signal for its await repeated a dedupe key with a different payload.
    ambiguous_signal: bool = False


@dataclass(frozen=True, slots=True)
class Diagnosis:
    label: Label
    blockers: tuple[Blocker, ...]
    reason: str


def diagnose(f: StepFacts) -> Diagnosis:
    blockers: list[Blocker] = []
    reasons: list[str] = []
    views = [d for d, _ in f.deps]

    if f.ambiguous_signal:
        blockers.append(Blocker.AMBIGUOUS_SIGNAL)
        reasons.append(
            "a signal repeated an earlier dedupe key with a different payload; the first "
            "stands (the signals table keeps both)"
        )
    elif f.needs_review:
        blockers.append(Blocker.AMBIGUOUS_OUTCOME)
        reasons.append(
            "a conflicting outcome was reported after the first one was recorded; "
            "the first stands (the evidence table keeps both)"
        )

    if f.state is StepState.PENDING:
        unfinished = [d for d in views if not dependency_satisfied(d.state, d.policy)]
        retrying = [d for d in unfinished if d.state is StepState.RETRYABLE]
        others = [d for d in unfinished if d.state is not StepState.RETRYABLE]
        if others:
            blockers.append(Blocker.WAITING_ON_DEPENDENCIES)
            reasons.append("waiting for " + _list(others))
        if retrying:
            blockers.append(Blocker.WAITING_ON_RETRYABLE_DEPENDENCY)
            reasons.append("waiting for the retry of " + _list(retrying))
        awaiting = f.awaiting_signal is not None
        if awaiting:
            blockers.append(Blocker.AWAITING_SIGNAL)
            reasons.append(_await_reason(f))
        decision = decide_child(views, awaiting_signal=awaiting)
        if decision.kind == "release":
            blockers.append(Blocker.RELEASE_NOT_APPLIED)
            reasons.append(
                "every dependency is satisfied but the release was not applied "
                "yet; the reconciler repairs this"
            )
        elif decision.kind == "cancel":
            blockers.append(Blocker.CANCEL_NOT_APPLIED)
            reasons.append(
                f"dependency {decision.cause!r} ended without completing, but the "
                "cascade was not applied yet; the reconciler repairs this"
            )

    if f.state in (StepState.PENDING, StepState.AVAILABLE):
        missing = sorted(
            d.step
            for d, has_result in f.deps
            if d.state is StepState.COMPLETED and not has_result and d.step in f.referenced
        )
        if missing:
            blockers.append(Blocker.MISSING_DEPENDENCY_RESULT)
            reasons.append("completed dependencies have no stored result: " + ", ".join(missing))

    if f.state is StepState.RETRYABLE:
        blockers.append(Blocker.RETRY_SCHEDULED)
        reasons.append("an attempt failed; the next one is scheduled")
    if f.state is StepState.FAILED:
        blockers.append(Blocker.STEP_FAILED)
        reasons.append(
            "failed after exhausting its attempts"
            if f.terminal_cause == "attempts_exhausted"
            else "failed: the signal it awaited did not arrive before its deadline"
            if f.terminal_cause == "signal_deadline_expired"
            else "failed"
        )
    if f.state is StepState.CANCELLED:
        if f.terminal_cause == "cancelled_by_dependency":
            blockers.append(Blocker.CANCELLED_BY_DEPENDENCY)
            root = (
                ""
                if f.cancel_root_step == f.cancelled_by_step
                else f", which was cancelled because {f.cancel_root_step!r} failed"
            )
            reasons.append(f"cancelled through its cancel edge from {f.cancelled_by_step!r}" + root)
        elif f.terminal_cause == "workflow_cancelled":
            reasons.append("cancelled by a cancel request for the whole workflow")
        else:
            reasons.append("cancelled")

    label = _label(f.state, blockers)
    if not reasons:
        reasons.append(
            {
                StepState.AVAILABLE: "released; waiting for a worker to claim it",
                StepState.EXECUTING: "a worker is running it",
                StepState.COMPLETED: "completed; its result is stored",
            }.get(f.state, f.state.value)
        )
    return Diagnosis(label, tuple(blockers), "; ".join(reasons))


def _label(state: StepState, blockers: list[Blocker]) -> Label:
    if {Blocker.AMBIGUOUS_OUTCOME, Blocker.AMBIGUOUS_SIGNAL} & set(blockers) or (
        state is StepState.FAILED
    ):
        return Label.NEEDS_REVIEW
    if state is StepState.CANCELLED:
        return Label.CANCELLED
    if state is StepState.COMPLETED:
        return Label.DONE
    if {
        Blocker.RELEASE_NOT_APPLIED,
        Blocker.CANCEL_NOT_APPLIED,
        Blocker.MISSING_DEPENDENCY_RESULT,
    } & set(blockers):
        return Label.BLOCKED
    if state is StepState.EXECUTING:
        return Label.RUNNING
    if state is StepState.AVAILABLE:
        return Label.RUNNABLE
    return Label.WAITING


def _await_reason(f: StepFacts) -> str:
    name = f"waiting for signal {f.awaiting_signal!r}"
    if not f.await_active:
        return name + " too, once its dependencies are satisfied (its deadline starts then)"
    if f.signal_deadline_at is not None:
        return name + f" (deadline {f.signal_deadline_at.isoformat()})"
    return name + " (no deadline)"


def _list(deps: Sequence[DependencyView]) -> str:
    return ", ".join(f"{d.step!r} ({d.state.value})" for d in deps)
