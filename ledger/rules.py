"""The transition rules of the workflow contract (semantics version 2).

Pure functions over plain values: no SQL, no Redis, no clock reads, no randomness of
their own. Every path that changes a step's state — `complete_step`, the engine's
consumers, the reconciler — asks these functions what to do, so each rule lives in
exactly one place.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

#: The contract version every workflow row carries.
SEMANTICS_VERSION = 2


class StepState(enum.StrEnum):
    #: Waiting on dependencies, or on a signal.
    PENDING = "pending"
    #: Released and runnable; waiting for a worker to claim it.
    AVAILABLE = "available"
    #: Claimed by a worker, which holds a lease on it.
    EXECUTING = "executing"
    #: An attempt failed and another is scheduled; descendants stay pending.
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: frozenset[StepState] = frozenset(
    {StepState.COMPLETED, StepState.FAILED, StepState.CANCELLED}
)
UNFINISHED_STATES: frozenset[StepState] = frozenset(StepState) - TERMINAL_STATES


class EdgePolicy(enum.StrEnum):
    #: A terminal failure or cancellation of the parent cancels the child (the default).
    CANCEL = "cancel"
    #: The parent finishing in any terminal state satisfies the child.
    CONTINUE = "continue"


class CompletionStatus(enum.StrEnum):
    """What a caller may report for a step."""

    COMPLETED = "completed"
    RETRYABLE = "retryable"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Classification(enum.StrEnum):
    """How an incoming event was classified. Everything but APPLIED is kept as evidence."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"
    AMBIGUOUS = "ambiguous"
    #: Not recorded at all: the caller made a mistake and gets an error.
    REJECTED = "rejected"


WorkflowOutcome = Literal["completed", "failed", "cancelled"]


def state_for_status(status: CompletionStatus) -> StepState:
    return StepState(status.value)


# -- releases and cascades -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DependencyView:
    """One dependency of a step as the rules see it."""

    step: str
    state: StepState
    policy: EdgePolicy


def dependency_satisfied(state: StepState, policy: EdgePolicy) -> bool:
    """A dependency is satisfied when it completed, or ended at all through a continue edge."""
    if state is StepState.COMPLETED:
        return True
    return policy is EdgePolicy.CONTINUE and state in TERMINAL_STATES


def dependency_cancels(state: StepState, policy: EdgePolicy) -> bool:
    """A dependency that ended without completing, through a cancel edge, cancels its child."""
    return policy is EdgePolicy.CANCEL and state in (StepState.FAILED, StepState.CANCELLED)


@dataclass(frozen=True, slots=True)
class ChildDecision:
    #: release: make it available. cancel: cascade. wait: a dependency is unfinished.
    #: await: every dependency is satisfied but the signal it awaits has not arrived —
    #: its await is active (the deadline runs) and it stays pending.
    kind: Literal["release", "cancel", "wait", "await"]
    #: For "cancel": the dependency whose terminal state caused it.
    cause: str | None = None


def decide_child(deps: Sequence[DependencyView], awaiting_signal: bool = False) -> ChildDecision:
    """What a pending step becomes, given its dependencies' states and edge policies, and
    whether it still awaits a signal (it has an await and no signal was accepted for it)."""
    for dep in deps:
        if dependency_cancels(dep.state, dep.policy):
            return ChildDecision("cancel", cause=dep.step)
    if all(dependency_satisfied(d.state, d.policy) for d in deps):
        return ChildDecision("await" if awaiting_signal else "release")
    return ChildDecision("wait")


# -- classifying an incoming outcome -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepSnapshot:
    state: StepState
    #: The number of the latest attempt started or recorded (0: never attempted).
    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class RecordedAttempt:
    attempt: int
    #: The status recorded.
    status: CompletionStatus
    payload: Any
    #: Why the recorded status differs from the reported one (attempts_exhausted).
    reason: str | None = None

    @property
    def reported_status(self) -> CompletionStatus:
        """The status the caller reported: a retryable on the last attempt is recorded
        as failed, and a repeat of that report is the same event."""
        if self.reason == "attempts_exhausted":
            return CompletionStatus.RETRYABLE
        return self.status


@dataclass(frozen=True, slots=True)
class CompletionDecision:
    classification: Classification
    #: The status to record when APPLIED (a retryable on the last attempt becomes failed).
    status: CompletionStatus
    #: The attempt number the outcome is recorded under when APPLIED.
    record_attempt: int
    #: Why, in a closed vocabulary: attempts_exhausted, dependencies_not_satisfied,
    #: attempt_not_started, stale_attempt, step_cancelled, conflicts_with_recorded_outcome.
    reason: str | None = None


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: key order is irrelevant and 1 == 1.0."""
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> str:
    return json.dumps(_integral_floats_to_int(value), sort_keys=True, separators=(",", ":"))


def _integral_floats_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_integral_floats_to_int(v) for v in value]
    return value


def _same(record: RecordedAttempt | None, status: CompletionStatus, payload: Any) -> bool:
    return (
        record is not None
        and status in (record.status, record.reported_status)
        and json_equal(record.payload, payload)
    )


def classify_completion(
    step: StepSnapshot,
    history: Mapping[int, RecordedAttempt],
    status: CompletionStatus,
    payload: Any,
    attempt: int | None = None,
) -> CompletionDecision:
    """Decide what an outcome reported for `step` does.

    `history` maps attempt numbers to what was recorded for them. `attempt` is given by
    the engine (the attempt its worker ran) and omitted by people calling the API, in
    which case an unclaimed step's outcome counts as its next attempt.
    """

    def verdict(c: Classification, reason: str | None = None) -> CompletionDecision:
        return CompletionDecision(c, status, attempt or step.attempt, reason)

    latest = history.get(step.attempt)

    # An outcome for an attempt that is not the live one: a replay of what was recorded,
    # or the word of a worker whose lease was revoked (the step is no longer executing).
    if attempt is not None:
        if attempt > step.attempt:
            return verdict(Classification.REJECTED, "attempt_not_started")
        live = step.state is StepState.EXECUTING or step.state in TERMINAL_STATES
        if attempt < step.attempt or not live:
            if _same(history.get(attempt), status, payload):
                return verdict(Classification.DUPLICATE)
            return verdict(Classification.LATE, "stale_attempt")

    if step.state in TERMINAL_STATES:
        if step.state is StepState.CANCELLED:
            if status is CompletionStatus.CANCELLED:
                return verdict(Classification.DUPLICATE)
            return verdict(Classification.LATE, "step_cancelled")
        if _same(latest, status, payload):
            return verdict(Classification.DUPLICATE)
        return verdict(Classification.AMBIGUOUS, "conflicts_with_recorded_outcome")

    if step.state is StepState.PENDING and status is not CompletionStatus.CANCELLED:
        return verdict(Classification.REJECTED, "dependencies_not_satisfied")

    if (
        step.state is StepState.RETRYABLE
        and status is CompletionStatus.RETRYABLE
        and _same(latest, status, payload)
    ):
        return verdict(Classification.DUPLICATE)

    record_attempt = step.attempt if step.state is StepState.EXECUTING else step.attempt + 1
    if status is CompletionStatus.RETRYABLE and record_attempt >= step.max_attempts:
        return CompletionDecision(
            Classification.APPLIED, CompletionStatus.FAILED, record_attempt, "attempts_exhausted"
        )
    return CompletionDecision(Classification.APPLIED, status, record_attempt)


# -- the workflow as a whole -----------------------------------------------------------------


def workflow_outcome(
    counts: Mapping[StepState, int], cancel_requested: bool = False
) -> WorkflowOutcome | None:
    """The final outcome once every step is terminal, else None."""
    if any(counts.get(s, 0) for s in UNFINISHED_STATES):
        return None
    if cancel_requested:
        return "cancelled"
    others = sum(n for s, n in counts.items() if s is not StepState.COMPLETED)
    return "completed" if others == 0 else "failed"


def count_states(states: Iterable[StepState]) -> dict[StepState, int]:
    counts = dict.fromkeys(StepState, 0)
    for s in states:
        counts[s] += 1
    return counts


# -- retries -------------------------------------------------------------------------------------


def retry_delay_seconds(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 300.0,
    jitter: float = 0.2,
    unit_random: float = 0.5,
) -> float:
    """Exponential backoff for the retry after `attempt` failed, with proportional jitter.

    `unit_random` is a number in [0, 1) supplied by the caller, so this stays pure; 0.5
    means no jitter at all.
    """
    raw = min(cap, base * 2.0 ** max(0, attempt - 1))
    return raw * (1.0 + jitter * (2.0 * unit_random - 1.0))


# -- claiming a step (a ready message arrived) -------------------------------------------


class ClaimVerdict(enum.StrEnum):
    #: The step is available: claim it.
    CLAIM = "claim"
    #: Another delivery already claimed it (executing): the message is a duplicate.
    DUPLICATE = "duplicate"
    #: The step already finished: the message is late.
    LATE = "late"
    #: The step is not released (pending) or waits for its retry time: not yet.
    NOT_READY = "not_ready"


def classify_claim(state: StepState) -> ClaimVerdict:
    """What a ready message for a step in `state` does."""
    if state is StepState.AVAILABLE:
        return ClaimVerdict.CLAIM
    if state is StepState.EXECUTING:
        return ClaimVerdict.DUPLICATE
    if state in TERMINAL_STATES:
        return ClaimVerdict.LATE
    return ClaimVerdict.NOT_READY


# -- cancel requests -------------------------------------------------------------------


class CancelEffect(enum.StrEnum):
    """What a cancel request did; every request is kept, whatever its effect."""

    #: The workflow was running: its unfinished steps were cancelled, outcome `cancelled`.
    APPLIED = "applied"
    #: An earlier request already cancelled it: nothing more to do.
    REPEATED = "repeated"
    #: It had already finished with another outcome, which stands.
    FINISHED = "finished"


def classify_cancel(outcome: str | None) -> CancelEffect:
    """What a cancel request does to a workflow whose outcome is `outcome` (None: running)."""
    if outcome is None:
        return CancelEffect.APPLIED
    if outcome == "cancelled":
        return CancelEffect.REPEATED
    if outcome in ("completed", "failed"):
        return CancelEffect.FINISHED
    raise ValueError(f"unknown workflow outcome {outcome!r}")


def cancelled_by_request(state: StepState) -> bool:
    """A cancel request cancels every step that is not terminal, executing ones included
    (their lease is revoked, so the worker's late report changes nothing)."""
    return state in UNFINISHED_STATES


# -- awaits and signals ----------------------------------------------------------------


class AwaitState(enum.StrEnum):
    """Where a step's wait for an external signal stands."""

    #: Its dependencies are not all satisfied yet: the deadline has not started. A signal
    #: arriving now is recorded and held.
    PENDING = "pending"
    #: Active: dependencies satisfied, the deadline runs; the signal releases the step.
    WAITING = "waiting"
    #: A signal released the step.
    SATISFIED = "satisfied"
    #: The deadline passed without a signal: the step failed.
    EXPIRED = "expired"
    #: The step ended otherwise (cascade, cancel request, by hand).
    CANCELLED = "cancelled"


class SignalClassification(enum.StrEnum):
    #: Matched an active await: the step is released.
    CONSUMED = "consumed"
    #: Arrived before its await was active: held, and consumed when it activates.
    RECORDED = "recorded"
    #: Same dedupe key and same payload as the first signal with that key.
    DUPLICATE = "duplicate"
    #: Same dedupe key, different payload: the first stands, the step is flagged.
    AMBIGUOUS = "ambiguous"
    #: Its await already had its signal, expired, or its step ended.
    LATE = "late"
    #: No step of the workflow awaits a signal of that name.
    UNMATCHED = "unmatched"


@dataclass(frozen=True, slots=True)
class AwaitView:
    state: AwaitState
    step_state: StepState
    #: A signal was already accepted for it (held while pending, or consumed).
    has_signal: bool


@dataclass(frozen=True, slots=True)
class PriorSignal:
    """The first signal recorded with the same name and dedupe key."""

    payload: Any


@dataclass(frozen=True, slots=True)
class SignalDecision:
    classification: SignalClassification
    #: Why, in a closed vocabulary: conflicts_with_first_signal, no_such_await,
    #: await_expired, step_finished, already_signalled.
    reason: str | None = None


def classify_signal(
    await_: AwaitView | None, prior: PriorSignal | None, payload: Any
) -> SignalDecision:
    """How an incoming signal is classified. A repeated dedupe key is judged first (the
    first signal with a key stands, whatever happened since), then the await it names."""
    if prior is not None:
        if json_equal(prior.payload, payload):
            return SignalDecision(SignalClassification.DUPLICATE)
        return SignalDecision(SignalClassification.AMBIGUOUS, "conflicts_with_first_signal")
    if await_ is None:
        return SignalDecision(SignalClassification.UNMATCHED, "no_such_await")
    if await_.state is AwaitState.EXPIRED:
        return SignalDecision(SignalClassification.LATE, "await_expired")
    if await_.state is AwaitState.CANCELLED or await_.step_state in TERMINAL_STATES:
        return SignalDecision(SignalClassification.LATE, "step_finished")
    if await_.has_signal or await_.state is AwaitState.SATISFIED:
        return SignalDecision(SignalClassification.LATE, "already_signalled")
    if await_.step_state is not StepState.PENDING:
        return SignalDecision(SignalClassification.LATE, "already_signalled")
    if await_.state is AwaitState.WAITING:
        return SignalDecision(SignalClassification.CONSUMED)
    return SignalDecision(SignalClassification.RECORDED)


def await_deadline(activated_at: datetime, deadline_ms: int | None) -> datetime | None:
    """When an await activated at `activated_at` expires (None: it waits for ever)."""
    if deadline_ms is None:
        return None
    return activated_at + timedelta(milliseconds=deadline_ms)


def await_expired(state: AwaitState, deadline_at: datetime | None, now: datetime) -> bool:
    """An active await whose deadline has come fails its step."""
    return state is AwaitState.WAITING and deadline_at is not None and now >= deadline_at
