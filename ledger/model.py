"""Values that cross the ledger's boundary: definitions going in, records coming out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.rules import Classification, EdgePolicy, StepState


@dataclass(frozen=True, slots=True)
class StepDefinition:
    """One step to insert. `args` is plain JSON with placeholders already encoded."""

    name: str
    worker: str
    queue: str
    args: dict[str, Any]
    max_attempts: int
    priority: int
    deps: tuple[tuple[str, EdgePolicy], ...] = ()
    #: The external signal this step also waits for, and how long it may take once
    #: the step's dependencies are satisfied (None: no deadline).
    await_signal: str | None = None
    signal_deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CallbackDefinition:
    """The `on_finish` job: run once, when the workflow records its final outcome."""

    worker: str
    queue: str
    args: dict[str, Any]
    max_attempts: int
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "queue": self.queue,
            "args": self.args,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
        }


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    name: str
    context: dict[str, Any]
    steps: tuple[StepDefinition, ...]
    on_finish: CallbackDefinition | None = None


@dataclass(frozen=True, slots=True)
class Counters:
    pending: int = 0
    #: `available` steps: released and waiting for a worker.
    runnable: int = 0
    executing: int = 0
    retryable: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        return (
            self.pending
            + self.runnable
            + self.executing
            + self.retryable
            + self.completed
            + self.failed
            + self.cancelled
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "runnable": self.runnable,
            "executing": self.executing,
            "retryable": self.retryable,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True, slots=True)
class StepRecord:
    name: str
    state: StepState
    attempt: int
    max_attempts: int
    worker: str
    queue: str
    priority: int
    args: dict[str, Any]
    needs_review: bool
    terminal_cause: str | None
    cancelled_by_step: str | None
    cancel_root_step: str | None
    scheduled_at: datetime | None
    finished_at: datetime | None
    deps: tuple[tuple[str, EdgePolicy], ...]
    #: For a step that awaits a signal: its name, the await's state (pending, waiting,
    #: satisfied, expired, cancelled), whether a signal was accepted for it, and when
    #: the active await expires.
    await_signal: str | None = None
    await_state: str | None = None
    signal_received: bool = False
    signal_deadline_at: datetime | None = None

    @property
    def awaiting_signal(self) -> bool:
        """True while the step still waits for its signal."""
        return (
            self.await_signal is not None
            and not self.signal_received
            and (self.await_state in ("pending", "waiting"))
        )


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    id: str
    name: str
    #: running | finished
    state: str
    #: None while running; completed | failed | cancelled once finished.
    outcome: str | None
    semantics_version: int
    context: dict[str, Any]
    counters: Counters
    needs_review: bool
    created_at: datetime
    finished_at: datetime | None
    steps: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == "finished"


#: What a ready message offers a worker: a workflow's step, or its `on_finish` callback.
STEP_JOB = "step"
CALLBACK_JOB = "callback"
#: The name a callback goes by where a step name is expected (ready messages, evidence).
CALLBACK_STEP = "on_finish"


@dataclass(frozen=True, slots=True)
class ReadyStep:
    """A step made available and marked dispatched: publish it to its queue's ready stream."""

    workflow_id: str
    step: str
    queue: str
    priority: int = 0
    #: step, or callback (then `step` is CALLBACK_STEP).
    job: str = STEP_JOB


@dataclass(frozen=True, slots=True)
class Claim:
    """A step claimed for one attempt: everything a worker needs to run it."""

    workflow_id: str
    workflow_name: str
    step: str
    attempt: int
    max_attempts: int
    worker: str
    queue: str
    #: The step's args with `Workflow.result(...)` placeholders resolved.
    args: dict[str, Any]
    workflow_context: dict[str, Any]
    #: Stored results of the step's dependencies, by step name.
    dependency_results: dict[str, Any]
    lease_owner: str
    lease_expires_at: datetime
    #: When the step last became available (its queue wait ends with this claim).
    available_at: datetime | None = None
    #: step, or callback (the workflow's `on_finish` job; `step` is then "on_finish").
    job: str = STEP_JOB
    #: For a step that awaited a signal: the payload of the signal that released it.
    signal: Any = None
    #: For a callback: the workflow's outcome and counters when it finished.
    workflow_outcome: str | None = None
    counters: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """What one `complete_step` call did."""

    workflow_id: str
    step: str
    classification: Classification
    #: The status recorded (a retryable on the last attempt is recorded as failed).
    status: str
    attempt: int
    #: Steps this call released into `available`, in release order.
    released: tuple[str, ...] = ()
    #: Steps this call cancelled through cancel edges.
    cancelled: tuple[str, ...] = ()
    #: The workflow's outcome if this call finished it.
    workflow_outcome: str | None = None
    reason: str | None = None
    #: With `dispatch=True`: the released steps this call marked dispatched. The caller
    #: publishes them after commit; if it cannot, the reconciler dispatches them again.
    ready: tuple[ReadyStep, ...] = ()
    #: step, or callback: the outcome of the workflow's `on_finish` callback (no
    #: children, no completion event).
    job: str = STEP_JOB
    #: With `hand_off_queues`: the released step left undispatched (and out of `ready`)
    #: for the caller to claim in this same transaction.
    hand_off: ReadyStep | None = None
    #: With a `hand_off_owner` too: that step, already claimed by this transaction.
    hand_off_claim: Claim | None = None

    @property
    def applied(self) -> bool:
        return self.classification is Classification.APPLIED


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What one cancel request did. The request itself is always kept as a row."""

    workflow_id: str
    #: The cancel request row's id.
    request_id: int
    #: applied | repeated | finished (see `ledger.rules.CancelEffect`).
    effect: str
    #: Steps this request cancelled, in position order.
    cancelled: tuple[str, ...]
    #: Of those, the steps a worker was running: their leases were revoked.
    revoked: tuple[str, ...]
    #: The workflow's outcome after the request: `cancelled` when applied, else the
    #: outcome it had already recorded.
    workflow_outcome: str | None

    @property
    def applied(self) -> bool:
        return self.effect == "applied"

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "request_id": self.request_id,
            "effect": self.effect,
            "cancelled": list(self.cancelled),
            "revoked": list(self.revoked),
            "workflow_outcome": self.workflow_outcome,
        }


@dataclass(frozen=True, slots=True)
class CancelRequestRecord:
    id: int
    reason: str | None
    requested_by: str | None
    effect: str
    cancelled_steps: int
    workflow_outcome: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CallbackAttemptRecord:
    """One delivery of a callback that ran, and what it returned."""

    attempt: int
    status: str
    payload: Any
    reason: str | None
    source: str
    lease_owner: str | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    """A workflow's `on_finish` callback, enqueued when the workflow finished."""

    workflow_id: str
    worker: str
    queue: str
    args: dict[str, Any]
    #: available | executing | retryable | completed | failed | cancelled
    state: str
    attempt: int
    max_attempts: int
    #: What it reports: the workflow's outcome and counters when it finished.
    workflow_outcome: str
    counters: dict[str, int]
    result: Any
    terminal_cause: str | None
    created_at: datetime
    finished_at: datetime | None
    attempts: tuple[CallbackAttemptRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "worker": self.worker,
            "queue": self.queue,
            "args": self.args,
            "state": self.state,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "workflow_outcome": self.workflow_outcome,
            "counters": dict(self.counters),
            "result": self.result,
            "terminal_cause": self.terminal_cause,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "attempts": [
                {
                    "attempt": a.attempt,
                    "status": a.status,
                    "payload": a.payload,
                    "reason": a.reason,
                    "source": a.source,
                    "lease_owner": a.lease_owner,
                    "recorded_at": a.recorded_at.isoformat(),
                }
                for a in self.attempts
            ],
        }


@dataclass(frozen=True, slots=True)
class SignalResult:
    """How one incoming signal was classified, and what it did."""

    workflow_id: str
    workflow_name: str
    name: str
    #: The signal row's id.
    signal_id: int
    #: consumed | recorded | duplicate | ambiguous | late | unmatched
    classification: str
    #: The step whose await it matched (None when unmatched).
    step: str | None
    reason: str | None = None
    #: Steps this signal released (the awaiting step, when consumed).
    released: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "name": self.name,
            "signal_id": self.signal_id,
            "classification": self.classification,
            "step": self.step,
            "reason": self.reason,
            "released": list(self.released),
        }


@dataclass(frozen=True, slots=True)
class SignalRecord:
    id: int
    name: str
    step: str | None
    classification: str
    payload: Any
    dedupe_key: str | None
    reason: str | None
    source: str
    created_at: datetime
    consumed_at: datetime | None
