"""Small helpers for the ledger suite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import Workflow


def states(engine: Engine, workflow_id: str) -> dict[str, str]:
    return {name: s.state.value for name, s in Workflow.get(engine, workflow_id).steps.items()}


def evidence(engine: Engine, workflow_id: str) -> list[dict[str, Any]]:
    e = t.evidence
    with engine.connect() as conn:
        rows = (
            conn.execute(
                select(e.c.step, e.c.classification, e.c.status, e.c.reason)
                .where(e.c.workflow_id == workflow_id)
                .order_by(e.c.id)
            )
            .mappings()
            .all()
        )
    return [dict(r) for r in rows]


def recount(engine: Engine, workflow_id: str) -> dict[str, int]:
    """Counters recomputed from step states, to compare with the stored ones."""
    counts = dict.fromkeys(
        ["pending", "runnable", "executing", "retryable", "completed", "failed", "cancelled"], 0
    )
    for state in states(engine, workflow_id).values():
        counts["runnable" if state == "available" else state] += 1
    return counts
