"""Hand-worked cases for the reference model in `tests.model`, so the oracle is checked too.

Each case is small enough to work out from the contract by hand; no database involved.
"""

from __future__ import annotations

from tests.model import (
    AMBIGUOUS,
    APPLIED,
    AVAILABLE,
    CANCELLED,
    COMPLETED,
    DUPLICATE,
    FAILED,
    LATE,
    PENDING,
    REJECTED,
    RETRYABLE,
    Evidence,
    StepPlan,
    WorkflowModel,
)


def chain(max_attempts: int = 3) -> WorkflowModel:
    """a -> b -> c through cancel edges."""
    return WorkflowModel(
        [
            StepPlan("a", {}, max_attempts),
            StepPlan("b", {"a": "cancel"}, max_attempts),
            StepPlan("c", {"b": "cancel"}, max_attempts),
        ]
    )


def states(m: WorkflowModel) -> dict[str, str]:
    return {n: s.state for n, s in m.steps.items()}


def test_roots_start_available_and_completion_releases_children() -> None:
    m = chain()
    assert states(m) == {"a": AVAILABLE, "b": PENDING, "c": PENDING}
    done = m.complete("a", COMPLETED, {"v": 1})
    assert (done.classification, done.status, done.attempt) == (APPLIED, COMPLETED, 1)
    assert done.released == {"b"} and not done.cancelled and done.finished_outcome is None
    assert states(m) == {"a": COMPLETED, "b": AVAILABLE, "c": PENDING}
    assert m.results() == {"a": {"v": 1}}


def test_retryable_keeps_children_pending_until_a_later_completion() -> None:
    m = chain()
    retry = m.complete("a", RETRYABLE, {"v": 1})
    assert (retry.classification, retry.status, retry.attempt) == (APPLIED, RETRYABLE, 1)
    assert not retry.released and states(m)["b"] == PENDING
    assert m.complete("a", RETRYABLE, {"v": 1}).classification == DUPLICATE
    done = m.complete("a", COMPLETED, {"v": 2})
    assert (done.attempt, done.released) == (2, frozenset({"b"}))
    assert [(a.number, a.status) for a in m.steps["a"].attempts] == [(1, RETRYABLE), (2, COMPLETED)]


def test_retryable_on_the_last_attempt_is_recorded_as_failed_and_cascades() -> None:
    m = chain(max_attempts=2)
    m.complete("a", RETRYABLE, {"v": 1})
    last = m.complete("a", RETRYABLE, {"v": 2})
    assert (last.status, last.attempt, last.exhausted) == (FAILED, 2, True)
    assert last.cancelled == {"b", "c"} and last.finished_outcome == FAILED
    assert m.steps["a"].attempts[-1].reason == "attempts_exhausted"
    # The same report again, and the recorded outcome itself, are repeats, not conflicts.
    assert m.complete("a", RETRYABLE, {"v": 2}).classification == DUPLICATE
    assert m.complete("a", FAILED, {"v": 2}).classification == DUPLICATE
    assert m.complete("a", FAILED, {"v": 1}).classification == AMBIGUOUS


def test_cascade_records_cause_and_root() -> None:
    m = chain()
    m.complete("a", COMPLETED, None)
    failed = m.complete("b", FAILED, {"v": 1})
    assert failed.cancelled == {"c"}
    c = m.steps["c"]
    assert (c.state, c.cancel_causes, c.cancel_root) == (CANCELLED, frozenset({"b"}), "b")
    assert m.steps["b"].cancel_causes == frozenset() and m.outcome == FAILED


def test_a_diamond_cascade_may_name_either_cancelled_parent() -> None:
    m = WorkflowModel(
        [
            StepPlan("r", {}, 1),
            StepPlan("x", {"r": "cancel"}, 1),
            StepPlan("y", {"r": "cancel"}, 1),
            StepPlan("z", {"x": "cancel", "y": "cancel"}, 1),
        ]
    )
    out = m.complete("r", CANCELLED, None)
    assert out.cancelled == {"x", "y", "z"}
    assert m.steps["z"].cancel_causes == {"x", "y"}
    assert {m.steps[n].cancel_root for n in "xyz"} == {"r"}


def test_continue_edges_release_cleanup_after_a_failure() -> None:
    m = WorkflowModel(
        [
            StepPlan("work", {}, 1),
            StepPlan("next", {"work": "cancel"}, 1),
            StepPlan("cleanup", {"work": "continue", "next": "continue"}, 1),
        ]
    )
    out = m.complete("work", FAILED, None)
    assert out.cancelled == {"next"} and out.released == {"cleanup"}
    assert out.finished_outcome is None
    done = m.complete("cleanup", COMPLETED, None)
    assert done.finished_outcome == FAILED and m.finished


def test_a_pending_step_only_takes_cancelled() -> None:
    m = chain()
    for status in (COMPLETED, RETRYABLE, FAILED):
        assert m.complete("b", status, None).classification == REJECTED
    assert states(m) == {"a": AVAILABLE, "b": PENDING, "c": PENDING}
    assert m.evidence == []
    out = m.complete("b", CANCELLED, None)
    assert (out.classification, out.attempt, out.cancelled) == (APPLIED, 1, frozenset({"c"}))
    assert m.steps["b"].cancel_causes == frozenset()


def test_evidence_for_repeats_conflicts_and_late_outcomes() -> None:
    m = chain()
    m.complete("a", COMPLETED, {"v": 1})
    m.complete("b", CANCELLED, None)
    assert m.complete("a", COMPLETED, {"v": 1}).classification == DUPLICATE
    assert m.complete("a", COMPLETED, {"v": 2}).classification == AMBIGUOUS
    assert m.complete("b", COMPLETED, None).classification == LATE
    assert m.complete("b", CANCELLED, {"v": 1}).classification == DUPLICATE
    assert m.evidence == [
        Evidence("a", DUPLICATE, COMPLETED, {"v": 1}),
        Evidence("a", AMBIGUOUS, COMPLETED, {"v": 2}),
        Evidence("b", LATE, COMPLETED, None),
        Evidence("b", DUPLICATE, CANCELLED, {"v": 1}),
    ]
    assert m.steps["a"].needs_review and m.needs_review and not m.steps["b"].needs_review
    assert m.results() == {"a": {"v": 1}}


def test_all_completed_is_a_completed_outcome() -> None:
    m = chain()
    m.complete("a", COMPLETED, None)
    m.complete("b", COMPLETED, None)
    assert m.complete("c", COMPLETED, None).finished_outcome == COMPLETED
    assert m.counters()[COMPLETED] == 3 and m.outcome == COMPLETED
