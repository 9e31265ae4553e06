"""What `perform(args, ctx)` receives, and how a worker cancels its step."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


class Cancel(Exception):
    """Raise from `perform` to record the step as `cancelled` (cascading like a failure)."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """The context of one attempt of one step."""

    workflow_id: str
    workflow_name: str
    step: str
    attempt: int
    max_attempts: int
    #: The workflow's context, as given to `Workflow.new`.
    workflow_context: dict[str, Any]
    #: Stored results of this step's dependencies, by step name (for an `on_finish`
    #: callback: of every completed step).
    results: dict[str, Any]
    #: For a step that awaited a signal: the payload of the signal that released it.
    signal: Any = None
    #: For an `on_finish` callback: the workflow's outcome (completed, failed, cancelled)
    #: and its step counters when it finished. None for steps.
    workflow_outcome: str | None = None
    counters: dict[str, int] | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel_requested(self) -> bool:
        """True once the worker is asked to stop this step early (its process is draining
        or the workflow was cancelled); long `perform`s should check it and return."""
        return self._cancel.is_set()
