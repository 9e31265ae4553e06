"""The lifecycle rules — cancel requests, signals and awaits — over their whole input spaces.

Pure functions of `ledger.rules`; the ledger tests check that every path calls them.
"""

from __future__ import annotations

import pytest

from ledger.rules import (
    TERMINAL_STATES,
    UNFINISHED_STATES,
    CancelEffect,
    StepState,
    cancelled_by_request,
    classify_cancel,
    workflow_outcome,
)

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
