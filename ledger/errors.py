"""Errors the ledger raises for caller mistakes. Each message says what to do next."""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class WorkflowNotFoundError(LedgerError, LookupError):
    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"no workflow with id {workflow_id!r}")
        self.workflow_id = workflow_id


class StepNotFoundError(LedgerError, LookupError):
    def __init__(self, workflow_id: str, step: str, known: list[str]) -> None:
        hint = ", ".join(repr(s) for s in known[:10]) + (", ..." if len(known) > 10 else "")
        super().__init__(f"workflow {workflow_id!r} has no step {step!r} (its steps: {hint})")
        self.workflow_id = workflow_id
        self.step = step


class InvalidCompletionError(LedgerError, ValueError):
    """An outcome that cannot be recorded as given; nothing was written."""


class SchemaNotReadyError(LedgerError):
    """The database has no Streamflow tables, or older ones: run `streamflow migrate`."""
