"""Streamflow: durable DAG workflows on a PostgreSQL ledger."""

from ledger.model import (
    CallbackAttemptRecord,
    CallbackRecord,
    CancelRequestRecord,
    CancelResult,
    CompletionResult,
    Counters,
    SignalRecord,
    SignalResult,
    StepRecord,
    WorkflowRecord,
)
from ledger.rules import SEMANTICS_VERSION
from streamflow.builder import Dep, PersistedWorkflow, ResultRef, StepSpec, Workflow
from streamflow.errors import (
    InvalidCompletionError,
    SchemaNotReadyError,
    StepNotFoundError,
    ValidationIssue,
    WorkflowNotFoundError,
    WorkflowValidationError,
)
from streamflow.explain import Explain, StepExplanation
from streamflow.worker import JobSpec, Worker

__all__ = [
    "SEMANTICS_VERSION",
    "CallbackAttemptRecord",
    "CallbackRecord",
    "CancelRequestRecord",
    "CancelResult",
    "CompletionResult",
    "Counters",
    "Dep",
    "Explain",
    "InvalidCompletionError",
    "JobSpec",
    "PersistedWorkflow",
    "ResultRef",
    "SchemaNotReadyError",
    "SignalRecord",
    "SignalResult",
    "StepExplanation",
    "StepNotFoundError",
    "StepRecord",
    "StepSpec",
    "ValidationIssue",
    "Worker",
    "Workflow",
    "WorkflowNotFoundError",
    "WorkflowRecord",
    "WorkflowValidationError",
]
