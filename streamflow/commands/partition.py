"""`streamflow migrate --partition-ledger`: the opt-in partitioning of the big tables.

The `migrate` command in `streamflow.cli` takes the options; the checks and the message
live here. The migration itself is the Alembic branch `partitioned`
(migrations/versions/p0001_partition_ledger.py), applied through `ledger.migrate`.
"""

from __future__ import annotations

from sqlalchemy import Engine

from ledger.migrate import partition_count, partition_ledger, partition_revision
from streamflow.cli import EXIT_USAGE, CliError
from streamflow.commands.operator import _whole

MAX_PARTITIONS = 256


def partitions_option(text: str) -> int:
    count = _whole(text, "--partitions", maximum=MAX_PARTITIONS)
    if count < 2:
        raise CliError(f"--partitions must be from 2 to {MAX_PARTITIONS}, got {text!r}", EXIT_USAGE)
    return count


def require_postgres(engine: Engine) -> None:
    """Refuse before anything is migrated."""
    if engine.dialect.name != "postgresql":
        raise CliError(
            "--partition-ledger needs PostgreSQL: SQLite has no table partitions "
            "(nothing was changed)",
            EXIT_USAGE,
        )


def apply_partitioning(engine: Engine, partitions: int) -> str:
    """Partition the ledger (already at the main head) unless it is; say what happened."""
    require_postgres(engine)
    with engine.connect() as conn:
        applied = partition_revision(conn)
        existing = partition_count(conn)
    if applied is not None:
        note = (
            ""
            if existing == partitions
            else "; to change the count, undo it first (docs/deployment.md, Partitioning)"
        )
        return (
            f"the step and evidence tables are already partitioned ({existing} partitions){note}."
        )
    partition_ledger(engine, partitions)
    return (
        f"partitioned streamflow_steps and streamflow_evidence into {partitions} partitions "
        "by hash of workflow id."
    )
