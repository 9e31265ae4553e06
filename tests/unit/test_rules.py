"""The transition rules, tested exhaustively over their (small) input spaces.

`ledger.rules` is pure: every function here takes values and returns values, so the
tests enumerate whole state spaces instead of picking examples.
"""

from __future__ import annotations

import itertools

import pytest

from ledger.rules import (
    TERMINAL_STATES,
    Classification,
    CompletionStatus,
    DependencyView,
    EdgePolicy,
    RecordedAttempt,
    StepSnapshot,
    StepState,
    classify_completion,
    decide_child,
    dependency_satisfied,
    retry_delay_seconds,
    state_for_status,
    workflow_outcome,
)

ALL_STATES = list(StepState)
ALL_POLICIES = list(EdgePolicy)
ALL_STATUSES = list(CompletionStatus)


# -- dependency satisfaction ------------------------------------------------------------


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_dependency_satisfied_by_completion_or_terminal_continue(
    state: StepState, policy: EdgePolicy
) -> None:
    expected = state is StepState.COMPLETED or (
        policy is EdgePolicy.CONTINUE and state in TERMINAL_STATES
    )
    assert dependency_satisfied(state, policy) is expected


def test_terminal_states_are_exactly_the_three() -> None:
    assert frozenset({StepState.COMPLETED, StepState.FAILED, StepState.CANCELLED}) == (
        TERMINAL_STATES
    )


# -- the child decision: every combination of up to three dependencies ------------------


def _all_dependency_sets(max_deps: int = 3) -> list[tuple[DependencyView, ...]]:
    pairs = list(itertools.product(ALL_STATES, ALL_POLICIES))
    out: list[tuple[DependencyView, ...]] = []
    for n in range(1, max_deps + 1):
        for combo in itertools.product(pairs, repeat=n):
            out.append(
                tuple(
                    DependencyView(step=f"p{i}", state=s, policy=p)
                    for i, (s, p) in enumerate(combo)
                )
            )
    return out


@pytest.mark.parametrize(
    "deps",
    _all_dependency_sets(),
    ids=lambda d: ",".join(f"{x.state.value}/{x.policy.value}" for x in d),
)
def test_decide_child_over_every_dependency_combination(
    deps: tuple[DependencyView, ...],
) -> None:
    decision = decide_child(deps)
    cancelling = [
        d
        for d in deps
        if d.policy is EdgePolicy.CANCEL and d.state in (StepState.FAILED, StepState.CANCELLED)
    ]
    if cancelling:
        # A terminal failure through a cancel edge wins, whatever else is true, and the
        # decision names the first such dependency as the cause.
        assert decision.kind == "cancel"
        assert decision.cause == cancelling[0].step
    elif all(dependency_satisfied(d.state, d.policy) for d in deps):
        assert decision.kind == "release"
        assert decision.cause is None
    else:
        assert decision.kind == "wait"
        assert decision.cause is None


def test_decide_child_with_no_dependencies_releases() -> None:
    # Root steps: nothing to wait for.
    assert decide_child(()).kind == "release"


# -- outcome statuses --------------------------------------------------------------------


def test_state_for_status() -> None:
    assert state_for_status(CompletionStatus.COMPLETED) is StepState.COMPLETED
    assert state_for_status(CompletionStatus.FAILED) is StepState.FAILED
    assert state_for_status(CompletionStatus.CANCELLED) is StepState.CANCELLED
    assert state_for_status(CompletionStatus.RETRYABLE) is StepState.RETRYABLE


def test_completion_status_rejects_unknown_values() -> None:
    with pytest.raises(ValueError):
        CompletionStatus("done")


# -- classifying an incoming completion -----------------------------------------------------


def snap(state: StepState, attempt: int = 1, max_attempts: int = 3) -> StepSnapshot:
    return StepSnapshot(state=state, attempt=attempt, max_attempts=max_attempts)


def rec(attempt: int, status: CompletionStatus, payload: object = None) -> RecordedAttempt:
    return RecordedAttempt(attempt=attempt, status=status, payload=payload)


@pytest.mark.parametrize("state", [StepState.AVAILABLE, StepState.EXECUTING, StepState.RETRYABLE])
@pytest.mark.parametrize("status", ALL_STATUSES)
def test_runnable_states_apply_any_status(state: StepState, status: CompletionStatus) -> None:
    history = (
        {1: rec(1, CompletionStatus.RETRYABLE, {"e": 1})} if state is StepState.RETRYABLE else {}
    )
    d = classify_completion(snap(state, attempt=1, max_attempts=5), history, status, {"x": 2})
    assert d.classification is Classification.APPLIED
    assert d.status is status
    # Unclaimed steps get the next attempt number; a claimed one records its own attempt.
    expected_attempt = 1 if state is StepState.EXECUTING else 2
    assert d.record_attempt == expected_attempt


def test_available_step_never_attempted_records_attempt_one() -> None:
    d = classify_completion(snap(StepState.AVAILABLE, attempt=0), {}, CompletionStatus.COMPLETED, 1)
    assert d.classification is Classification.APPLIED
    assert d.record_attempt == 1


@pytest.mark.parametrize(
    "status", [CompletionStatus.COMPLETED, CompletionStatus.FAILED, CompletionStatus.RETRYABLE]
)
def test_pending_step_cannot_be_completed(status: CompletionStatus) -> None:
    d = classify_completion(snap(StepState.PENDING, attempt=0), {}, status, None)
    assert d.classification is Classification.REJECTED
    assert d.reason == "dependencies_not_satisfied"


def test_pending_step_can_be_cancelled() -> None:
    d = classify_completion(
        snap(StepState.PENDING, attempt=0), {}, CompletionStatus.CANCELLED, None
    )
    assert d.classification is Classification.APPLIED
    assert d.status is CompletionStatus.CANCELLED


def test_retryable_on_last_attempt_becomes_failed() -> None:
    d = classify_completion(
        snap(StepState.EXECUTING, attempt=3, max_attempts=3),
        {},
        CompletionStatus.RETRYABLE,
        {"e": 1},
    )
    assert d.classification is Classification.APPLIED
    assert d.status is CompletionStatus.FAILED
    assert d.reason == "attempts_exhausted"


def test_retryable_before_last_attempt_stays_retryable() -> None:
    d = classify_completion(
        snap(StepState.EXECUTING, attempt=2, max_attempts=3), {}, CompletionStatus.RETRYABLE, None
    )
    assert d.status is CompletionStatus.RETRYABLE
    assert d.reason is None


def test_repeated_retryable_with_same_payload_is_duplicate() -> None:
    history = {2: rec(2, CompletionStatus.RETRYABLE, {"e": "boom"})}
    d = classify_completion(
        snap(StepState.RETRYABLE, attempt=2), history, CompletionStatus.RETRYABLE, {"e": "boom"}
    )
    assert d.classification is Classification.DUPLICATE


def test_retryable_with_new_payload_is_a_new_attempt() -> None:
    history = {2: rec(2, CompletionStatus.RETRYABLE, {"e": "boom"})}
    d = classify_completion(
        snap(StepState.RETRYABLE, attempt=2, max_attempts=5),
        history,
        CompletionStatus.RETRYABLE,
        {"e": "other"},
    )
    assert d.classification is Classification.APPLIED
    assert d.record_attempt == 3


TERMINAL_STATUS = {
    StepState.COMPLETED: CompletionStatus.COMPLETED,
    StepState.FAILED: CompletionStatus.FAILED,
    StepState.CANCELLED: CompletionStatus.CANCELLED,
}


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("status", ALL_STATUSES)
@pytest.mark.parametrize("same_payload", [True, False])
def test_terminal_states_never_change(
    state: StepState, status: CompletionStatus, same_payload: bool
) -> None:
    recorded_status = TERMINAL_STATUS[state]
    history = {1: rec(1, recorded_status, {"v": 1})}
    payload = {"v": 1} if same_payload else {"v": 2}
    d = classify_completion(snap(state, attempt=1), history, status, payload)
    assert d.classification is not Classification.APPLIED
    if status is recorded_status and (same_payload or state is StepState.CANCELLED):
        assert d.classification is Classification.DUPLICATE
    elif state is StepState.CANCELLED:
        assert d.classification is Classification.LATE
    else:
        assert d.classification is Classification.AMBIGUOUS


def test_cascade_cancelled_step_without_record() -> None:
    # A step cancelled by its dependency has no attempt row: a repeated cancel is a
    # duplicate, anything else is late.
    s = snap(StepState.CANCELLED, attempt=0)
    assert classify_completion(s, {}, CompletionStatus.CANCELLED, None).classification is (
        Classification.DUPLICATE
    )
    for status in (CompletionStatus.COMPLETED, CompletionStatus.FAILED, CompletionStatus.RETRYABLE):
        assert classify_completion(s, {}, status, None).classification is Classification.LATE


def test_json_equal_payloads_are_duplicates() -> None:
    # 1 and 1.0 are the same JSON number; key order does not matter.
    history = {1: rec(1, CompletionStatus.COMPLETED, {"a": 1, "b": [1, 2]})}
    d = classify_completion(
        snap(StepState.COMPLETED), history, CompletionStatus.COMPLETED, {"b": [1.0, 2], "a": 1}
    )
    assert d.classification is Classification.DUPLICATE


# -- attempts named by the caller (the engine's path) --------------------------------------


def test_current_attempt_applies() -> None:
    d = classify_completion(
        snap(StepState.EXECUTING, attempt=2), {}, CompletionStatus.COMPLETED, 1, attempt=2
    )
    assert d.classification is Classification.APPLIED
    assert d.record_attempt == 2


@pytest.mark.parametrize("state", ALL_STATES)
def test_stale_attempt_is_late_unless_it_repeats_its_record(state: StepState) -> None:
    history = {1: rec(1, CompletionStatus.RETRYABLE, {"e": 1})}
    s = snap(state, attempt=2)
    same = classify_completion(s, history, CompletionStatus.RETRYABLE, {"e": 1}, attempt=1)
    other = classify_completion(s, history, CompletionStatus.COMPLETED, {"ok": 1}, attempt=1)
    assert same.classification is Classification.DUPLICATE
    assert other.classification is Classification.LATE


def test_completion_of_a_revoked_lease_is_late() -> None:
    # The lease of attempt 2 expired and the step went back to `available`: the old
    # worker's completion must not count.
    d = classify_completion(
        snap(StepState.AVAILABLE, attempt=2), {}, CompletionStatus.COMPLETED, 1, attempt=2
    )
    assert d.classification is Classification.LATE


def test_attempt_never_started_is_rejected() -> None:
    d = classify_completion(
        snap(StepState.EXECUTING, attempt=2), {}, CompletionStatus.COMPLETED, 1, attempt=3
    )
    assert d.classification is Classification.REJECTED
    assert d.reason == "attempt_not_started"


# -- workflow outcome ------------------------------------------------------------------------


def _counts(**kw: int) -> dict[StepState, int]:
    return {StepState(k): v for k, v in kw.items()}


def test_outcome_none_while_any_step_unfinished() -> None:
    for state in set(ALL_STATES) - TERMINAL_STATES:
        assert workflow_outcome(_counts(completed=3, **{state.value: 1})) is None


def test_outcome_completed_when_all_completed() -> None:
    assert workflow_outcome(_counts(completed=4)) == "completed"


@pytest.mark.parametrize("other", ["failed", "cancelled"])
def test_outcome_failed_when_any_step_not_completed(other: str) -> None:
    assert workflow_outcome(_counts(completed=4, **{other: 1})) == "failed"


def test_outcome_cancelled_when_cancel_was_requested() -> None:
    assert workflow_outcome(_counts(completed=1, cancelled=3), cancel_requested=True) == "cancelled"


# -- retry backoff ---------------------------------------------------------------------------


def test_retry_delay_grows_exponentially_and_is_capped() -> None:
    delays = [retry_delay_seconds(a, base=1.0, cap=60.0, jitter=0.0) for a in range(1, 10)]
    assert delays[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert max(delays) == 60.0


@pytest.mark.parametrize("unit", [0.0, 0.5, 0.999])
def test_retry_delay_jitter_stays_within_its_fraction(unit: float) -> None:
    d = retry_delay_seconds(3, base=1.0, cap=60.0, jitter=0.25, unit_random=unit)
    assert 4.0 * 0.75 <= d <= 4.0 * 1.25


def test_repeated_retryable_after_exhaustion_is_a_duplicate_not_a_conflict() -> None:
    # The last attempt's `retryable` was recorded as `failed`; the same report delivered
    # again is the same event, not a conflicting outcome (found by the stateful test).
    history = {
        1: RecordedAttempt(1, CompletionStatus.FAILED, {"e": 1}, reason="attempts_exhausted")
    }
    s = snap(StepState.FAILED, attempt=1, max_attempts=1)
    same = classify_completion(s, history, CompletionStatus.RETRYABLE, {"e": 1})
    other = classify_completion(s, history, CompletionStatus.RETRYABLE, {"e": 2})
    failed = classify_completion(s, history, CompletionStatus.FAILED, {"e": 1})
    assert same.classification is Classification.DUPLICATE
    assert other.classification is Classification.AMBIGUOUS
    # `failed` with the same payload agrees with what is recorded: no conflict either.
    assert failed.classification is Classification.DUPLICATE


# -- claims ----------------------------------------------------------------------------------


def test_classify_claim_covers_every_state() -> None:
    from ledger.rules import ClaimVerdict, classify_claim

    expected = {
        StepState.PENDING: ClaimVerdict.NOT_READY,
        StepState.AVAILABLE: ClaimVerdict.CLAIM,
        StepState.EXECUTING: ClaimVerdict.DUPLICATE,
        StepState.RETRYABLE: ClaimVerdict.NOT_READY,
        StepState.COMPLETED: ClaimVerdict.LATE,
        StepState.FAILED: ClaimVerdict.LATE,
        StepState.CANCELLED: ClaimVerdict.LATE,
    }
    assert {s: classify_claim(s) for s in StepState} == expected
