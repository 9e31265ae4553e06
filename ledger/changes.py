"""The state moves one transaction makes, and the workflow counters that follow them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.model import ReadyStep
from ledger.rules import StepState, workflow_outcome

#: The workflow counter column for each step state.
COUNTER_COLUMNS: dict[StepState, str] = {s: f"{s.value}_count" for s in StepState}


@dataclass
class Changes:
    """State moves made in this transaction, so the workflow counters follow exactly."""

    delta: dict[StepState, int] = field(default_factory=lambda: dict.fromkeys(StepState, 0))
    released: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    #: Released steps with their queues, in release order.
    ready: list[ReadyStep] = field(default_factory=list)
    #: Steps whose dependencies are satisfied and whose await became active.
    awaiting: list[str] = field(default_factory=list)

    def move(self, old: StepState, new: StepState) -> None:
        self.delta[old] -= 1
        self.delta[new] += 1


@dataclass(frozen=True, slots=True)
class WorkflowUpdate:
    """What `changes` do to a locked workflow row."""

    #: The row's new values: every counter, updated_at, and the outcome if it finished.
    values: dict[str, Any]
    #: The counts by state after the changes.
    counts: dict[StepState, int]
    #: The outcome this update records (None: still running, or finished before).
    outcome: str | None


def workflow_update(
    wf: dict[str, Any], changes: Changes, now: datetime, *, cancel_requested: bool = False
) -> WorkflowUpdate:
    """The counters after `changes`, and the workflow's outcome if they finish it (a
    recorded outcome is never rewritten)."""
    counts = {s: wf[COUNTER_COLUMNS[s]] + changes.delta[s] for s in StepState}
    outcome = workflow_outcome(counts, cancel_requested=cancel_requested)
    if wf["state"] == "finished":
        outcome = None
    values: dict[str, Any] = {COUNTER_COLUMNS[s]: counts[s] for s in StepState}
    values["updated_at"] = now
    if outcome is not None:
        values.update(state="finished", outcome=outcome, finished_at=now)
    return WorkflowUpdate(values, counts, outcome)
