"""One entry point per worker operation, for either job a ready message can carry: a
workflow's step (`ledger.claims`, `ledger.transitions`) or its `on_finish` callback
(`ledger.callback_jobs`). The worker calls these with the message's `job`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from ledger.callback_jobs import (
    claim_callback,
    complete_callback,
    release_callback_claim,
    renew_callback_lease,
)
from ledger.claims import Claim, ClaimRefused, claim_step, release_claim, renew_lease
from ledger.model import CALLBACK_JOB, STEP_JOB, CompletionResult
from ledger.transitions import complete_step, mark_dispatched

JOBS = (STEP_JOB, CALLBACK_JOB)


def _check(job: str) -> None:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; use one of: {', '.join(JOBS)}")


def claim_job(
    conn: Connection,
    job: str,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    message_at: datetime | None = None,
) -> Claim | ClaimRefused:
    _check(job)
    if job == CALLBACK_JOB:
        return claim_callback(
            conn, workflow_id, step, owner=owner, lease_seconds=lease_seconds, now=now
        )
    return claim_step(
        conn,
        workflow_id,
        step,
        owner=owner,
        lease_seconds=lease_seconds,
        now=now,
        message_at=message_at,
    )


def complete_job(
    conn: Connection,
    job: str,
    workflow_id: str,
    step: str,
    status: str,
    payload: Any,
    *,
    attempt: int,
    source: str,
    now: datetime,
    dispatch: bool,
    hand_off_queues: Collection[str] = (),
    hand_off_owner: str | None = None,
    hand_off_lease_seconds: float = 30.0,
) -> CompletionResult:
    """`hand_off_queues`: see `complete_step` (a callback releases nothing).

    With `hand_off_owner`, the step handed off is always claimed for that owner in this
    transaction and returned in `hand_off_claim` (by `complete_step` itself where it
    can, here otherwise). If it cannot be claimed after all, it is marked dispatched
    and added to `ready` instead, so it is published like any other.
    """
    _check(job)
    outcome = (workflow_id, step, status, payload)
    common: dict[str, Any] = {
        "attempt": attempt,
        "source": source,
        "now": now,
        "dispatch": dispatch,
    }
    if job == CALLBACK_JOB:
        return complete_callback(conn, *outcome, **common)
    result = complete_step(
        conn,
        *outcome,
        **common,
        hand_off_queues=hand_off_queues,
        hand_off_owner=hand_off_owner,
        hand_off_lease_seconds=hand_off_lease_seconds,
    )
    ready = result.hand_off
    if ready is None or result.hand_off_claim is not None or hand_off_owner is None:
        return result
    claimed = claim_step(
        conn,
        ready.workflow_id,
        ready.step,
        owner=hand_off_owner,
        lease_seconds=hand_off_lease_seconds,
        now=now,
        workflow_locked=True,
    )
    if isinstance(claimed, Claim):
        return replace(result, hand_off_claim=claimed)
    # Not claimable after all: dispatch it as usual.
    marked = mark_dispatched(conn, [ready], now)
    return replace(result, hand_off=None, ready=result.ready + marked)


def renew_job_lease(
    conn: Connection,
    job: str,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    attempt: int,
    lease_seconds: float,
    now: datetime,
) -> bool:
    _check(job)
    renew = renew_callback_lease if job == CALLBACK_JOB else renew_lease
    return renew(
        conn, workflow_id, step, owner=owner, attempt=attempt, lease_seconds=lease_seconds, now=now
    )


def release_job_claim(
    conn: Connection,
    job: str,
    workflow_id: str,
    step: str,
    *,
    owner: str,
    attempt: int,
    now: datetime,
) -> bool:
    _check(job)
    release = release_callback_claim if job == CALLBACK_JOB else release_claim
    return release(conn, workflow_id, step, owner=owner, attempt=attempt, now=now)
