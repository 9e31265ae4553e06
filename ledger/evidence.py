"""Evidence rows: every incoming event that did not simply apply is kept."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from ledger import tables as t


def record_evidence(
    conn: Connection,
    *,
    workflow_id: str,
    step: str | None,
    kind: str,
    classification: str,
    source: str,
    now: datetime,
    status: str | None = None,
    attempt: int | None = None,
    payload: Any = None,
    reason: str | None = None,
    dedupe_key: str | None = None,
) -> None:
    conn.execute(
        insert(t.evidence).values(
            workflow_id=workflow_id,
            step=step,
            kind=kind,
            classification=classification,
            source=source,
            status=status,
            attempt=attempt,
            payload=payload,
            reason=reason,
            dedupe_key=dedupe_key,
            created_at=now,
        )
    )
