"""The lifecycle rules — cancel requests, signals and awaits — over their whole input spaces.

Pure functions of `ledger.rules`; the ledger tests check that every path calls them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ledger.rules import (
    TERMINAL_STATES,
    UNFINISHED_STATES,
    AwaitState,
    AwaitView,
    CancelEffect,
    DependencyView,
    EdgePolicy,
    PriorSignal,
    SignalClassification,
    StepState,
    await_deadline,
    await_expired,
    cancelled_by_request,
    classify_cancel,
    classify_signal,
    decide_child,
    workflow_outcome,
)
from tests.unit.test_rules import _all_dependency_sets

ALL_STATES = list(StepState)

# -- cancel requests ---------------------------------------------------------------------


def test_a_request_for_a_running_workflow_applies() -> None:
    assert classify_cancel(None) is CancelEffect.APPLIED


def test_a_request_for_a_cancelled_workflow_is_a_repeat() -> None:
    assert classify_cancel("cancelled") is CancelEffect.REPEATED


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_request_for_a_finished_workflow_keeps_its_outcome(outcome: str) -> None:
    assert classify_cancel(outcome) is CancelEffect.FINISHED


def test_classify_cancel_rejects_an_unknown_outcome() -> None:
    with pytest.raises(ValueError, match="unknown workflow outcome"):
        classify_cancel("exploded")


@pytest.mark.parametrize("state", ALL_STATES)
def test_a_request_cancels_exactly_the_unfinished_steps(state: StepState) -> None:
    assert cancelled_by_request(state) is (state in UNFINISHED_STATES)
    assert cancelled_by_request(state) is not (state in TERMINAL_STATES)


@pytest.mark.parametrize("completed", [0, 1, 5])
@pytest.mark.parametrize("failed", [0, 2])
def test_once_every_step_is_terminal_a_request_makes_the_outcome_cancelled(
    completed: int, failed: int
) -> None:
    counts = {StepState.COMPLETED: completed, StepState.FAILED: failed, StepState.CANCELLED: 1}
    assert workflow_outcome(counts, cancel_requested=True) == "cancelled"
    assert workflow_outcome(counts) == "failed"


# -- awaits: the child decision with a signal gate -----------------------------------------------

SIGNALS = list(SignalClassification)


@pytest.mark.parametrize("deps", _all_dependency_sets(2), ids=str)
def test_a_signal_gate_only_holds_back_a_release(deps: tuple[DependencyView, ...]) -> None:
    without = decide_child(deps)
    gated = decide_child(deps, awaiting_signal=True)
    if without.kind == "release":
        # Dependencies satisfied, signal missing: the await is active, the step waits.
        assert gated.kind == "await"
    else:
        # Waiting stays waiting, and a cancelling dependency cancels regardless.
        assert gated == without
    assert decide_child(deps, awaiting_signal=False) == without


def test_a_root_step_awaiting_a_signal_is_an_active_await() -> None:
    assert decide_child([], awaiting_signal=True).kind == "await"
    assert decide_child([]).kind == "release"


def test_a_cancelling_dependency_wins_over_a_missing_signal() -> None:
    deps = [
        DependencyView("ok", StepState.COMPLETED, EdgePolicy.CANCEL),
        DependencyView("bad", StepState.FAILED, EdgePolicy.CANCEL),
    ]
    decision = decide_child(deps, awaiting_signal=True)
    assert (decision.kind, decision.cause) == ("cancel", "bad")


# -- awaits: deadlines -----------------------------------------------------------------------

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_the_deadline_runs_from_activation() -> None:
    assert await_deadline(T0, 4 * 3600 * 1000) == T0 + timedelta(hours=4)
    assert await_deadline(T0, None) is None


@pytest.mark.parametrize("state", list(AwaitState))
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_only_an_active_await_past_its_deadline_expires(state: AwaitState, offset: int) -> None:
    deadline = T0
    now = T0 + timedelta(seconds=offset)
    expected = state is AwaitState.WAITING and offset >= 0
    assert await_expired(state, deadline, now) is expected
    assert await_expired(state, None, now) is False


# -- signals: every classification ------------------------------------------------------------


def view(state: AwaitState, step: StepState = StepState.PENDING, held: bool = False) -> AwaitView:
    return AwaitView(state=state, step_state=step, has_signal=held)


def test_a_signal_for_an_active_await_is_consumed() -> None:
    d = classify_signal(view(AwaitState.WAITING), None, {"ok": True})
    assert (d.classification, d.reason) == (SignalClassification.CONSUMED, None)


def test_a_signal_before_its_await_is_active_is_recorded_and_held() -> None:
    d = classify_signal(view(AwaitState.PENDING), None, {"ok": True})
    assert d.classification is SignalClassification.RECORDED


def test_a_signal_nobody_awaits_is_unmatched() -> None:
    d = classify_signal(None, None, 1)
    assert (d.classification, d.reason) == (SignalClassification.UNMATCHED, "no_such_await")


@pytest.mark.parametrize(
    ("await_", "reason"),
    [
        (view(AwaitState.SATISFIED, StepState.AVAILABLE, held=True), "already_signalled"),
        (view(AwaitState.WAITING, held=True), "already_signalled"),
        (view(AwaitState.PENDING, held=True), "already_signalled"),
        (view(AwaitState.EXPIRED, StepState.FAILED), "await_expired"),
        (view(AwaitState.CANCELLED, StepState.CANCELLED), "step_finished"),
        (view(AwaitState.WAITING, StepState.CANCELLED), "step_finished"),
        (view(AwaitState.PENDING, StepState.CANCELLED), "step_finished"),
    ],
)
def test_a_signal_after_its_await_resolved_expired_or_ended_is_late(
    await_: AwaitView, reason: str
) -> None:
    d = classify_signal(await_, None, {"ok": True})
    assert (d.classification, d.reason) == (SignalClassification.LATE, reason)


@pytest.mark.parametrize("await_", [None, *[view(s) for s in AwaitState]], ids=str)
def test_a_repeated_dedupe_key_is_a_duplicate_or_ambiguous_whatever_the_await(
    await_: AwaitView | None,
) -> None:
    first = PriorSignal(payload={"amount": 1, "by": "ann"})
    same = classify_signal(await_, first, {"by": "ann", "amount": 1.0})
    other = classify_signal(await_, first, {"amount": 2, "by": "ann"})
    assert same.classification is SignalClassification.DUPLICATE
    assert (other.classification, other.reason) == (
        SignalClassification.AMBIGUOUS,
        "conflicts_with_first_signal",
    )


def test_every_classification_is_reachable_and_named_as_stored() -> None:
    assert {c.value for c in SIGNALS} == {
        "consumed",
        "recorded",
        "duplicate",
        "ambiguous",
        "late",
        "unmatched",
    }
