"""The immutable Workflow builder: steps, dependencies and result placeholders."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from ledger import operations
from ledger.db import Repo
from ledger.insert import runnable_roots
from ledger.model import (
    CallbackDefinition,
    CallbackRecord,
    CancelRequestRecord,
    CancelResult,
    CompletionResult,
    SignalRecord,
    SignalResult,
    StepDefinition,
    WorkflowDefinition,
    WorkflowRecord,
)
from ledger.placeholders import result_marker
from ledger.rules import EdgePolicy
from streamflow import telemetry
from streamflow.engine.common import publish_or_hand_back
from streamflow.errors import WorkflowValidationError
from streamflow.streams.publisher import Publisher
from streamflow.validation import StepShape, validate
from streamflow.worker import JobSpec

_POLICIES = tuple(p.value for p in EdgePolicy)


@dataclass(frozen=True, slots=True)
class ResultRef:
    """Stands for the stored result of `step`; made by `Workflow.result(step)`."""

    step: str


@dataclass(frozen=True, slots=True)
class Dep:
    """A dependency with an edge policy: `cancel` (default) or `continue`.

    With `continue`, the dependency finishing in any terminal state (completed, failed
    or cancelled) satisfies this step, so cleanup and compensation still run.
    """

    step: str
    policy: str = "cancel"

    def __post_init__(self) -> None:
        if not isinstance(self.step, str):
            raise TypeError(f"Dep step must be a step name (str), got {self.step!r}")
        if self.policy not in _POLICIES:
            raise ValueError(
                f"unknown edge policy {self.policy!r}; use one of: {', '.join(_POLICIES)}"
            )


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    job: JobSpec
    deps: tuple[Dep, ...] = ()
    #: The external signal the step waits for besides its dependencies, if any.
    await_signal: str | None = None
    #: How long that signal may take once the dependencies are satisfied.
    signal_deadline: timedelta | None = None


@dataclass(frozen=True, slots=True)
class PersistedWorkflow:
    """What `Workflow.insert` returns."""

    id: str
    name: str
    steps: tuple[StepSpec, ...]
    workflow_context: dict[str, Any]

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]


@dataclass(frozen=True, slots=True)
class Workflow:
    """A workflow definition. Immutable: `add` returns a new Workflow.

    ```python
    wf = (
        Workflow.new(
            name="sync_customer",
            workflow_context={"account_id": 42},
            on_finish=NotifyOps.new({"channel": "#billing"}),  # optional
        )
        .add("fetch", FetchCustomer.new({"account_id": 42}))
        .add("bill", SyncBilling.new({"customer": Workflow.result("fetch")}), deps=["fetch"])
        .add("cleanup", Cleanup.new({}), deps=[Dep("bill", policy="continue")])
    )
    persisted = Workflow.insert(wf, engine)
    ```
    """

    name: str
    workflow_context: dict[str, Any] = field(default_factory=dict)
    steps: tuple[StepSpec, ...] = ()
    #: Run once when the workflow records its final outcome (see `Workflow.new`).
    on_finish: JobSpec | None = None

    # -- building ---------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        name: str,
        workflow_context: dict[str, Any] | None = None,
        *,
        on_finish: JobSpec | None = None,
    ) -> Workflow:
        """A new, empty workflow definition.

        `on_finish` (a job from `MyWorker.new(args)`) is enqueued exactly once, in the
        transaction that records the workflow's final outcome — completed, failed or
        cancelled — and run by a worker serving its queue. Its `ctx` carries
        `workflow_outcome` and `counters` (and `results`: every completed step's result).
        """
        if on_finish is not None and not isinstance(on_finish, JobSpec):
            raise TypeError(
                f"on_finish must come from MyWorker.new(args), got {type(on_finish).__name__}"
            )
        context = {} if workflow_context is None else workflow_context
        # Copied so later changes to the caller's dict do not reach the definition; a
        # value that cannot be copied cannot be stored either, and validation says so.
        with contextlib.suppress(Exception):
            context = copy.deepcopy(context)
        return cls(name=name, workflow_context=context, on_finish=on_finish)

    def add(
        self,
        name: str,
        job: JobSpec,
        deps: Iterable[str | Dep] | str | Dep = (),
        *,
        await_signal: str | None = None,
        signal_deadline: timedelta | None = None,
    ) -> Workflow:
        """A new Workflow with step `name` added, running `job` after `deps`.

        With `await_signal`, the step also waits for an external signal of that name
        (`Workflow.signal`): it becomes available only once its dependencies are satisfied
        *and* the signal arrived, and its payload is `ctx.signal` when it runs. With
        `signal_deadline`, a signal that has not arrived that long after the dependencies
        were satisfied fails the step (cascading as any failure).
        """
        if not isinstance(job, JobSpec):
            raise TypeError(
                f"step {name!r}: job must come from MyWorker.new(args), got {type(job).__name__}"
            )
        dep_list = [deps] if isinstance(deps, str | Dep) else list(deps)
        normalized: list[Dep] = []
        for d in dep_list:
            if isinstance(d, Dep):
                normalized.append(d)
            elif isinstance(d, str):
                normalized.append(Dep(d))
            else:
                raise TypeError(
                    f"step {name!r}: each dependency is a step name or a Dep, got {d!r}"
                )
        step = StepSpec(
            name=name,
            job=job,
            deps=tuple(normalized),
            await_signal=await_signal,
            signal_deadline=signal_deadline,
        )
        return dataclasses.replace(self, steps=(*self.steps, step))

    @staticmethod
    def result(step: str) -> ResultRef:
        """A placeholder for `step`'s stored result, resolved when the dependent step runs."""
        return ResultRef(step)

    # -- validation -------------------------------------------------------------------

    def validate(self) -> list[Any]:
        """Every problem with this definition (empty when it can be inserted)."""
        return validate(
            self.name,
            self.workflow_context,
            [_shape(s) for s in self.steps],
            on_finish=None if self.on_finish is None else _job_shape("on_finish", self.on_finish),
        )

    def definition(self) -> WorkflowDefinition:
        """The ledger's form of this workflow; raises WorkflowValidationError if invalid."""
        issues = self.validate()
        if issues:
            raise WorkflowValidationError(issues)
        return WorkflowDefinition(
            name=self.name,
            context=self.workflow_context,
            steps=tuple(
                StepDefinition(
                    name=s.name,
                    worker=s.job.worker,
                    queue=s.job.queue,
                    args=_encode(s.job.args, []),
                    max_attempts=s.job.max_attempts,
                    priority=s.job.priority,
                    deps=tuple((d.step, EdgePolicy(d.policy)) for d in s.deps),
                    await_signal=s.await_signal,
                    signal_deadline_ms=None
                    if s.signal_deadline is None
                    else max(1, round(s.signal_deadline.total_seconds() * 1000)),
                )
                for s in self.steps
            ),
            on_finish=None
            if self.on_finish is None
            else CallbackDefinition(
                worker=self.on_finish.worker,
                queue=self.on_finish.queue,
                args=_encode(self.on_finish.args, []),
                max_attempts=self.on_finish.max_attempts,
                priority=self.on_finish.priority,
            ),
        )

    # -- the ledger -------------------------------------------------------------------

    def insert(self, repo: Repo, *, publisher: Publisher | None = None) -> PersistedWorkflow:
        """Validate and write this workflow; with a Connection, in the caller's transaction.

        Raises WorkflowValidationError (listing every problem) and writes nothing if the
        definition is invalid.

        With `publisher` (`Publisher.connect(redis_url)`, on an Engine): this call
        publishes the workflow's first steps to their ready streams right after its
        commit, rather than the dispatcher after the commit wakes it, one hop sooner to a
        worker. If Redis is away they go back to the dispatcher; nothing is lost either way.
        """
        if publisher is not None and not isinstance(repo, Engine):
            raise ValueError(
                "publisher= publishes after the insert's commit, so it needs an Engine: on "
                "a Connection the caller commits. Leave it out and the dispatcher publishes "
                "the first steps once your transaction commits."
            )
        definition = self.definition()
        workflow_id = operations.insert(repo, definition, dispatch=publisher is not None)
        telemetry.workflow_inserted(definition)
        if publisher is not None:
            assert isinstance(repo, Engine)
            publish_or_hand_back(repo, publisher, runnable_roots(workflow_id, definition))
        return PersistedWorkflow(workflow_id, self.name, self.steps, self.workflow_context)

    @staticmethod
    def complete_step(
        repo: Repo,
        workflow_id: str,
        step: str,
        *,
        status: str,
        payload: Any = None,
        attempt: int | None = None,
    ) -> CompletionResult:
        """Record `step`'s outcome and release or cancel its descendants, atomically.

        `status` is completed, retryable, failed or cancelled. Repeats and conflicts are
        kept as evidence (`duplicate`, `late`, `ambiguous`) and change nothing.
        """
        result = operations.complete(repo, workflow_id, step, status, payload, attempt=attempt)
        telemetry.completion_recorded(repo, result, source="api")
        return result

    @staticmethod
    def cancel(
        repo: Repo,
        workflow_id: str,
        *,
        reason: str | None = None,
        requested_by: str | None = None,
    ) -> CancelResult:
        """Cancel the workflow: keep a cancel request row, cancel every step that is not
        terminal (revoking the leases of running ones, whose late reports then change
        nothing) and record the outcome `cancelled`.

        A workflow that already finished keeps its outcome; the request is still recorded
        (effect `finished`, or `repeated` when it was already cancelled).
        """
        return operations.cancel(
            repo, workflow_id, reason=reason, requested_by=requested_by, source="api"
        )

    @staticmethod
    def cancel_requests(repo: Repo, workflow_id: str) -> list[CancelRequestRecord]:
        """Every cancel request recorded for the workflow, oldest first."""
        return operations.cancel_requests(repo, workflow_id)

    @staticmethod
    def signal(
        repo: Repo,
        workflow_id: str,
        name: str,
        payload: Any = None,
        *,
        dedupe_key: str | None = None,
    ) -> SignalResult:
        """Send the workflow an external signal; every signal is kept, classified.

        `consumed`: a step awaiting `name` had its dependencies satisfied, and is released
        now (its `ctx.signal` is `payload`). `recorded`: it is not ready yet; the signal is
        held and releases it when it is. `duplicate` / `ambiguous`: `dedupe_key` was used
        before with the same / a different payload (the first stands; ambiguous flags the
        step for review). `late`: the await already had its signal, expired, or its step
        ended. `unmatched`: no step of the workflow awaits `name`.
        """
        result = operations.signal(repo, workflow_id, name, payload, dedupe_key=dedupe_key)
        telemetry.signal_recorded(
            workflow_name=result.workflow_name, classification=result.classification
        )
        return result

    @staticmethod
    def signals(repo: Repo, workflow_id: str) -> list[SignalRecord]:
        """Every signal the workflow received, oldest first, with its classification."""
        return operations.signals(repo, workflow_id)

    @staticmethod
    def callback(repo: Repo, workflow_id: str) -> CallbackRecord | None:
        """The workflow's `on_finish` callback with every delivery and its result; None
        until the workflow finishes (or if it has none)."""
        return operations.callback(repo, workflow_id)

    @staticmethod
    def get(repo: Repo, workflow_id: str) -> WorkflowRecord:
        """The workflow with its state, outcome, counters and every step's state."""
        return operations.get(repo, workflow_id)

    @staticmethod
    def results(repo: Repo, workflow_id: str) -> dict[str, Any]:
        """`{step_name: stored payload}` for the completed steps."""
        return operations.results(repo, workflow_id)


def _encode(value: Any, refs: list[str]) -> Any:
    """Replace ResultRef placeholders with their stored JSON form, collecting their steps."""
    if isinstance(value, ResultRef):
        refs.append(value.step)
        return result_marker(value.step)
    if isinstance(value, dict):
        return {k: _encode(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v, refs) for v in value]
    return value


def _shape(s: StepSpec) -> StepShape:
    shape = _job_shape(s.name, s.job, [d.step for d in s.deps])
    return dataclasses.replace(
        shape, await_signal=s.await_signal, signal_deadline=s.signal_deadline
    )


def _job_shape(name: str, job: JobSpec, deps: list[str] | None = None) -> StepShape:
    refs: list[str] = []
    encoded = _encode(job.args, refs)
    return StepShape(
        name=name,
        deps=deps or [],
        references=refs,
        encoded_args=encoded,
        queue=job.queue,
        max_attempts=job.max_attempts,
        priority=job.priority,
        worker=job.worker,
    )
