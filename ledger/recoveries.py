"""Recovery rows: every repair the ledger makes on its own says what, why and from what."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from ledger import tables as t


def record_recovery(
    conn: Connection,
    *,
    workflow_id: str,
    step: str | None,
    repair: str,
    reason: str,
    now: datetime,
    evidence: dict[str, Any] | None = None,
    pass_id: int | None = None,
) -> None:
    conn.execute(
        insert(t.recoveries).values(
            pass_id=pass_id,
            workflow_id=workflow_id,
            step=step,
            repair=repair,
            reason=reason,
            evidence=evidence,
            created_at=now,
        )
    )
