"""The ledger's transactional operations on a `repo` (an Engine or the caller's Connection).

Thin on purpose: each opens the right transaction and calls the module that does the
work. `streamflow` calls these; they never call back into `streamflow`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.callbacks import get_callback
from ledger.cancel import cancel_requests as read_cancel_requests
from ledger.cancel import cancel_workflow
from ledger.db import Repo, read, transaction
from ledger.explain import StepExplanation, explain_step
from ledger.insert import insert_workflow
from ledger.model import (
    CallbackRecord,
    CancelRequestRecord,
    CancelResult,
    CompletionResult,
    SignalRecord,
    SignalResult,
    WorkflowDefinition,
    WorkflowRecord,
)
from ledger.reads import get_results, get_workflow
from ledger.rules import CompletionStatus
from ledger.signals import record_signal, signals_of
from ledger.transitions import complete_step


def insert(
    repo: Repo,
    definition: WorkflowDefinition,
    now: datetime | None = None,
    *,
    dispatch: bool = False,
) -> str:
    with transaction(repo) as conn:
        return insert_workflow(conn, definition, now, dispatch=dispatch)


def complete(
    repo: Repo,
    workflow_id: str,
    step: str,
    status: str | CompletionStatus,
    payload: Any = None,
    *,
    attempt: int | None = None,
    source: str = "api",
    now: datetime | None = None,
    retry_at: datetime | None = None,
) -> CompletionResult:
    with transaction(repo) as conn:
        return complete_step(
            conn,
            workflow_id,
            step,
            status,
            payload,
            attempt=attempt,
            source=source,
            now=now,
            retry_at=retry_at,
        )


def get(repo: Repo, workflow_id: str) -> WorkflowRecord:
    with read(repo) as conn:
        return get_workflow(conn, workflow_id)


def results(repo: Repo, workflow_id: str) -> dict[str, Any]:
    with read(repo) as conn:
        return get_results(conn, workflow_id)


def explain(repo: Repo, workflow_id: str, step: str) -> StepExplanation:
    with read(repo) as conn:
        return explain_step(conn, workflow_id, step)


def cancel(
    repo: Repo,
    workflow_id: str,
    *,
    reason: str | None = None,
    requested_by: str | None = None,
    source: str = "api",
    now: datetime | None = None,
) -> CancelResult:
    with transaction(repo) as conn:
        return cancel_workflow(
            conn, workflow_id, reason=reason, requested_by=requested_by, source=source, now=now
        )


def cancel_requests(repo: Repo, workflow_id: str) -> list[CancelRequestRecord]:
    with read(repo) as conn:
        return read_cancel_requests(conn, workflow_id)


def callback(repo: Repo, workflow_id: str) -> CallbackRecord | None:
    with read(repo) as conn:
        return get_callback(conn, workflow_id)


def signal(
    repo: Repo,
    workflow_id: str,
    name: str,
    payload: Any = None,
    *,
    dedupe_key: str | None = None,
    source: str = "api",
    now: datetime | None = None,
) -> SignalResult:
    with transaction(repo) as conn:
        return record_signal(
            conn, workflow_id, name, payload, dedupe_key=dedupe_key, source=source, now=now
        )


def signals(repo: Repo, workflow_id: str) -> list[SignalRecord]:
    with read(repo) as conn:
        return signals_of(conn, workflow_id)
