"""Small lookups about steps that several operations share."""

from __future__ import annotations

from sqlalchemy import Connection, select

from ledger import tables as t
from ledger.errors import StepNotFoundError


def step_not_found(conn: Connection, workflow_id: str, step: str) -> StepNotFoundError:
    """The error for a step the workflow does not have, listing the steps it does have."""
    s = t.steps
    known = (
        conn.execute(select(s.c.name).where(s.c.workflow_id == workflow_id).order_by(s.c.position))
        .scalars()
        .all()
    )
    return StepNotFoundError(workflow_id, step, list(known))
