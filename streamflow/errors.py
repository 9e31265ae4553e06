"""Errors users see. The ledger's errors are re-exported under the same names."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.errors import (
    InvalidCompletionError,
    LedgerError,
    SchemaNotReadyError,
    StepNotFoundError,
    WorkflowNotFoundError,
)

__all__ = [
    "InvalidCompletionError",
    "LedgerError",
    "SchemaNotReadyError",
    "StepNotFoundError",
    "ValidationIssue",
    "WorkflowNotFoundError",
    "WorkflowValidationError",
]


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem found in a workflow definition."""

    #: duplicate_step, missing_dependency, self_loop, cycle, not_json_safe, invalid_name,
    #: duplicate_dependency, empty_workflow, invalid_job, invalid_await, duplicate_await
    code: str
    #: The step concerned, or None for the workflow itself (its name or context).
    step: str | None
    message: str

    def __str__(self) -> str:
        where = f"step {self.step!r}" if self.step is not None else "workflow"
        return f"[{self.code}] {where}: {self.message}"


class WorkflowValidationError(ValueError):
    """The workflow cannot be inserted; `.errors` lists every problem. Nothing was written."""

    def __init__(self, errors: list[ValidationIssue]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        count = len(self.errors)
        super().__init__(
            f"workflow is invalid ({count} problem{'s' if count != 1 else ''}):\n{lines}"
        )
