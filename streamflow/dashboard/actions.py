"""The dashboard's three actions — cancel, retry, signal — and their previews.

Each action is the very call its CLI command makes (`streamflow cancel`, `retry`,
`signal`), with `source="dashboard"` on what it records. A preview runs the same call in a
transaction that is always rolled back, so the confirmation page shows exactly what the
ledger would do now (which steps a cancel stops, which a retry restores, or the ledger's
own refusal), with no second copy of the rules. A rolled-back write leaves nothing behind:
no row, and no NOTIFY (PostgreSQL sends those on commit only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from ledger import operations
from ledger.cancel import cancel_workflow
from ledger.db import transaction
from ledger.model import CancelResult, SignalResult
from ledger.operator import RetryResult, retry_step
from streamflow import telemetry
from streamflow.dashboard.data import BadInput
from streamflow.explain import Explain

T = TypeVar("T")

#: What the ledger records as the source and requester of the dashboard's actions.
SOURCE = "dashboard"
#: Longest reason, dedupe key and payload the forms accept.
MAX_REASON = 1000
MAX_DEDUPE_KEY = 200
MAX_PAYLOAD = 64 * 1024


@contextmanager
def _rolled_back(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        finally:
            trans.rollback()


def _dry_run(engine: Engine, action: Callable[[Connection], T]) -> T:
    with _rolled_back(engine) as conn:
        return action(conn)


def clean_reason(text: str) -> str | None:
    reason = text.strip()
    if len(reason) > MAX_REASON:
        raise BadInput(f"the reason is {len(reason)} characters long; at most {MAX_REASON}")
    return reason or None


# -- cancel -----------------------------------------------------------------------------------


def preview_cancel(engine: Engine, workflow_id: str) -> CancelResult:
    return _dry_run(
        engine,
        lambda conn: cancel_workflow(
            conn, workflow_id, reason=None, requested_by=SOURCE, source=SOURCE
        ),
    )


def cancel(engine: Engine, workflow_id: str, reason: str | None) -> CancelResult:
    return operations.cancel(engine, workflow_id, reason=reason, requested_by=SOURCE, source=SOURCE)


# -- retry ------------------------------------------------------------------------------------


def _retry(conn: Connection, workflow_id: str, step: str, reason: str | None) -> RetryResult:
    return retry_step(conn, workflow_id, step, reason=reason, now=datetime.now(UTC), source=SOURCE)


def preview_retry(engine: Engine, workflow_id: str, step: str) -> RetryResult:
    """Raises OperatorError (with the ledger's reason) when the step cannot be retried."""
    return _dry_run(engine, lambda conn: _retry(conn, workflow_id, step, None))


def retry(engine: Engine, workflow_id: str, step: str, reason: str | None) -> RetryResult:
    with transaction(engine) as conn:
        return _retry(conn, workflow_id, step, reason)


# -- signal -----------------------------------------------------------------------------------


def awaited_signal(engine: Engine, workflow_id: str, step: str) -> tuple[str, str | None]:
    """The signal `step` awaits and its await's state; BadInput if it awaits none."""
    e = Explain.workflow_step(workflow_id, step, repo=engine)
    if e.await_signal is None:
        raise BadInput(f"step {step!r} awaits no signal; only a step added with await_signal=...")
    return e.await_signal, e.await_state


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (use null or a number)")


def parse_payload(text: str) -> Any:
    """The payload field as JSON; blank means null. BadInput says what is wrong."""
    if len(text) > MAX_PAYLOAD:
        raise BadInput(f"the payload is {len(text)} characters long; at most {MAX_PAYLOAD}")
    if not text.strip():
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise BadInput(f"the payload is not valid JSON: {exc}") from None
    try:
        # 1e999 parses as infinity; JSON has no such number.
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise BadInput("the payload is not valid JSON: a number is out of range") from None
    return value


def signal(
    engine: Engine, workflow_id: str, step: str, payload: Any, dedupe_key: str | None
) -> SignalResult:
    """Send the signal `step` awaits, as `streamflow signal` does."""
    name, _ = awaited_signal(engine, workflow_id, step)
    if dedupe_key is not None and len(dedupe_key) > MAX_DEDUPE_KEY:
        raise BadInput(f"the dedupe key is longer than {MAX_DEDUPE_KEY} characters")
    result = operations.signal(
        engine, workflow_id, name, payload, dedupe_key=dedupe_key, source=SOURCE
    )
    telemetry.signal_recorded(
        workflow_name=result.workflow_name,
        classification=result.classification,
        source="operator",
    )
    return result
