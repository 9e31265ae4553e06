"""A small reference model of the workflow contract, for the stateful tests.

Independent of `ledger.rules` on purpose: it is written straight from the contract with
plain dicts and strings, so where it and the ledger disagree one of them misread the
contract. It models what `complete_step` does to one workflow (nothing claims steps
here, so no step is ever `executing`):

- roots start `available`, every other step `pending`;
- `completed` stores the payload and releases each pending step whose dependencies are
  all satisfied (a dependency is satisfied when it completed, or when it is terminal in
  any way and the edge is `continue`);
- `retryable` records an attempt and leaves descendants alone; recorded on the step's
  last attempt (attempt >= max_attempts) it becomes `failed` (attempts_exhausted);
- `failed`/`cancelled` are terminal and cancel every pending step that has a `cancel`
  edge from a failed or cancelled dependency, recursively;
- a repeated outcome is a `duplicate`; one that conflicts with a recorded terminal
  outcome is `ambiguous` and flags the step for review; anything but `cancelled` for a
  cancelled step is `late`; only `cancelled` may be recorded for a pending step
  (anything else is `rejected`: an error, and nothing is written);
- once every step is terminal the workflow is finished, with outcome `completed` when
  every step completed and `failed` otherwise.

Interpretations where the contract's wording leaves room (each is the reading the
contract's own sentences support; see the test module for how they are checked):

- the attempt number of an outcome given through the API is "one more than the last
  recorded", so the n-th applied outcome of a step is attempt n (a `cancelled` recorded
  for a step that never ran is attempt 1 too);
- "repeated" compares with the step's latest recorded outcome, as it was reported: a
  retryable report that exhausted the attempts and was recorded as `failed` is repeated
  by the same retryable report (a duplicate delivery), and also matched by `failed` with
  the same payload, which is the recorded outcome itself;
- `cancelled` for a cancelled step is a duplicate whatever its payload: a cancellation
  carries no result;
- a cascade may reach a step through several cancelling dependencies at once; any of
  them is a correct `cancelled_by_step`. The cascade root is always the step whose
  outcome this call recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
AVAILABLE = "available"
RETRYABLE = "retryable"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (PENDING, AVAILABLE, "executing", RETRYABLE, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
STATUSES = (COMPLETED, RETRYABLE, FAILED, CANCELLED)

CANCEL_EDGE = "cancel"
CONTINUE_EDGE = "continue"

APPLIED = "applied"
DUPLICATE = "duplicate"
LATE = "late"
AMBIGUOUS = "ambiguous"
REJECTED = "rejected"


@dataclass(frozen=True)
class StepPlan:
    """One step of a generated workflow: its dependencies (parent -> edge policy)."""

    name: str
    deps: dict[str, str]
    max_attempts: int


@dataclass(frozen=True)
class Attempt:
    """One recorded outcome. `reported` is what the caller said, `status` what was kept."""

    number: int
    reported: str
    status: str
    payload: Any
    reason: str | None


@dataclass
class StepModel:
    plan: StepPlan
    state: str
    attempts: list[Attempt] = field(default_factory=list)
    needs_review: bool = False
    #: Set for steps cancelled by a cascade: every dependency that could have caused it.
    cancel_causes: frozenset[str] = frozenset()
    cancel_root: str | None = None
    exhausted: bool = False

    @property
    def attempt(self) -> int:
        return len(self.attempts)


@dataclass(frozen=True)
class Evidence:
    step: str
    classification: str
    status: str
    payload: Any


@dataclass(frozen=True)
class Expected:
    """What one `complete_step` call should do."""

    classification: str
    #: For APPLIED: the status recorded and its attempt number.
    status: str | None = None
    attempt: int | None = None
    exhausted: bool = False
    released: frozenset[str] = frozenset()
    cancelled: frozenset[str] = frozenset()
    #: The workflow outcome when this call finished the workflow.
    finished_outcome: str | None = None


def satisfied(state: str, policy: str) -> bool:
    return state == COMPLETED or (policy == CONTINUE_EDGE and state in TERMINAL)


def cancels(state: str, policy: str) -> bool:
    return policy == CANCEL_EDGE and state in (FAILED, CANCELLED)


class WorkflowModel:
    def __init__(self, plan: list[StepPlan]) -> None:
        self.order = [p.name for p in plan]
        self.steps: dict[str, StepModel] = {
            p.name: StepModel(p, PENDING if p.deps else AVAILABLE) for p in plan
        }
        self.evidence: list[Evidence] = []
        self.needs_review = False

    # -- views ------------------------------------------------------------------------

    def state(self, name: str) -> str:
        return self.steps[name].state

    def counters(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for s in self.steps.values():
            counts[s.state] += 1
        return counts

    @property
    def finished(self) -> bool:
        return all(s.state in TERMINAL for s in self.steps.values())

    @property
    def outcome(self) -> str | None:
        if not self.finished:
            return None
        return COMPLETED if all(s.state == COMPLETED for s in self.steps.values()) else FAILED

    def results(self) -> dict[str, Any]:
        return {
            name: s.attempts[-1].payload for name, s in self.steps.items() if s.state == COMPLETED
        }

    def runnable(self) -> list[str]:
        return [n for n in self.order if self.steps[n].state in (AVAILABLE, RETRYABLE)]

    # -- the one operation --------------------------------------------------------------

    def complete(self, name: str, status: str, payload: Any) -> Expected:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        step = self.steps[name]
        verdict = self._classify(step, status, payload)
        if verdict == REJECTED:
            return Expected(REJECTED)
        if verdict != APPLIED:
            self.evidence.append(Evidence(name, verdict, status, payload))
            if verdict == AMBIGUOUS:
                step.needs_review = True
                self.needs_review = True
            return Expected(verdict)

        number = step.attempt + 1
        recorded, reason = status, None
        if status == RETRYABLE and number >= step.plan.max_attempts:
            recorded, reason = FAILED, "attempts_exhausted"
            step.exhausted = True
        step.attempts.append(Attempt(number, status, recorded, payload, reason))
        step.state = recorded
        released, cancelled = self._reconcile(root=name)
        return Expected(
            APPLIED,
            status=recorded,
            attempt=number,
            exhausted=step.exhausted,
            released=released,
            cancelled=cancelled,
            finished_outcome=self.outcome,
        )

    def _classify(self, step: StepModel, status: str, payload: Any) -> str:
        if step.state == CANCELLED:
            return DUPLICATE if status == CANCELLED else LATE
        last = step.attempts[-1] if step.attempts else None
        repeats_last = (
            last is not None
            and payload == last.payload
            and (status in (last.reported, last.status))
        )
        if step.state in TERMINAL:
            return DUPLICATE if repeats_last else AMBIGUOUS
        if step.state == PENDING:
            return APPLIED if status == CANCELLED else REJECTED
        if step.state == RETRYABLE and status == RETRYABLE and repeats_last:
            return DUPLICATE
        return APPLIED

    def _reconcile(self, root: str) -> tuple[frozenset[str], frozenset[str]]:
        """Release and cascade-cancel pending steps until nothing changes."""
        released: set[str] = set()
        cancelled: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name in self.order:
                step = self.steps[name]
                if step.state != PENDING:
                    continue
                deps = [(self.steps[d].state, policy) for d, policy in step.plan.deps.items()]
                if any(cancels(s, p) for s, p in deps):
                    step.state = CANCELLED
                    step.cancel_root = root
                    cancelled.add(name)
                    changed = True
                elif all(satisfied(s, p) for s, p in deps):
                    step.state = AVAILABLE
                    released.add(name)
                    changed = True
        for name in cancelled:
            step = self.steps[name]
            step.cancel_causes = frozenset(
                d for d, p in step.plan.deps.items() if cancels(self.steps[d].state, p)
            )
        return frozenset(released), frozenset(cancelled)
