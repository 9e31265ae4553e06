"""Pruning finished workflows (and old reconciler passes) from the ledger.

A workflow may go once its final outcome was recorded before a cutoff and its `on_finish`
callback (if any) is no longer live. Work goes in batches, each its own short transaction:

* the batch is picked from the partial index on the workflows' finish time, oldest first;
* on PostgreSQL the workflow rows are taken with `FOR UPDATE SKIP LOCKED`. Every
  transition of a workflow's rows locks its workflow row first (`ledger.db.lock_workflow`),
  so a workflow someone is working on right now (an operator's retry, a late event) is
  simply skipped by this batch rather than waited for — pruning never queues behind the
  hot path, and the hot path waits at most for one short batch on a workflow that is
  being deleted anyway;
* every row that belongs to those workflows goes, table by table, children first, so the
  counts are exact and nothing depends on ON DELETE CASCADE being honoured.

Reconciler pass summaries are not per workflow: they are pruned by age on their own, in
batches by primary key, always keeping the newest finished pass (the next pass reads its
start time). Recoveries keep their `pass_id` as a plain number (there is no foreign key).
Evidence about workflows that never existed (`unmatched` events naming an unknown id)
belongs to no workflow and is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, exists, func, select

from ledger import tables as t

#: Callback states in which the `on_finish` job may still run: such a workflow stays.
#: (`ix_streamflow_callbacks_live` covers exactly these.)
_LIVE_CALLBACK = ("available", "executing", "retryable")

#: Every table holding rows of a workflow, children before parents, with the column that
#: names the workflow. `streamflow_workflows` itself goes last.
WORKFLOW_TABLES: tuple[tuple[Table, str], ...] = (
    (t.callback_attempts, "workflow_id"),
    (t.callbacks, "workflow_id"),
    (t.awaits, "workflow_id"),
    (t.edges, "workflow_id"),
    (t.results, "workflow_id"),
    (t.attempts, "workflow_id"),
    (t.signals, "workflow_id"),
    (t.cancel_requests, "workflow_id"),
    (t.evidence, "workflow_id"),
    (t.recoveries, "workflow_id"),
    (t.steps, "workflow_id"),
    (t.workflows, "id"),
)

#: An archive line: the workflow's rows, table by table.
Archiver = Callable[[dict[str, Any]], None]


@dataclass
class PruneCounts:
    """Rows deleted (or, for a dry run, that would be), by table."""

    workflows: int = 0
    rows: dict[str, int] = field(
        default_factory=lambda: {table.name: 0 for table, _ in WORKFLOW_TABLES}
    )
    reconciler_passes: int = 0

    def add(self, other: PruneCounts) -> None:
        self.workflows += other.workflows
        self.reconciler_passes += other.reconciler_passes
        for name, n in other.rows.items():
            self.rows[name] = self.rows.get(name, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflows": self.workflows,
            "rows": dict(self.rows),
            "reconciler_passes": self.reconciler_passes,
        }


def _prunable(cutoff: datetime) -> Any:
    """The condition on `streamflow_workflows` rows that may be pruned."""
    w, c = t.workflows, t.callbacks
    live_callback = exists().where(
        c.c.workflow_id == w.c.id, t.in_states(c.c.state, _LIVE_CALLBACK)
    )
    return t.in_state(w.c.state, "finished") & (w.c.finished_at < cutoff) & ~live_callback


def find_prunable(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """Up to `limit` prunable workflow ids, oldest outcome first, locked for this
    transaction on PostgreSQL — skipping any row another transaction holds."""
    w = t.workflows
    query = select(w.c.id).where(_prunable(cutoff)).order_by(w.c.finished_at).limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=w, skip_locked=True)
    return list(conn.execute(query).scalars())


def _rows_of(conn: Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every row of the workflows `ids`, grouped by workflow then table (for the archive)."""
    out: dict[str, dict[str, Any]] = {wid: {} for wid in ids}
    for table, column in reversed(WORKFLOW_TABLES):
        key = "workflow" if table is t.workflows else table.name.removeprefix("streamflow_")
        for wid in ids:
            out[wid][key] = [] if table is not t.workflows else None
        query = select(table).where(table.c[column].in_(ids))
        for row in conn.execute(query).mappings():
            wid = row[column]
            if table is t.workflows:
                out[wid][key] = dict(row)
            else:
                out[wid][key].append(dict(row))
    return out


def prune_batch(
    conn: Connection, cutoff: datetime, limit: int, archive: Archiver | None = None
) -> PruneCounts:
    """Delete one batch of prunable workflows inside the caller's transaction.

    With `archive`, each workflow's rows are handed to it (one dict per workflow) before
    anything is deleted; if it raises, the transaction rolls back and nothing goes.
    """
    ids = find_prunable(conn, cutoff, limit)
    counts = PruneCounts()
    if not ids:
        return counts
    if archive is not None:
        for wid, rows in _rows_of(conn, ids).items():
            archive({"workflow_id": wid, **rows})
    for table, column in WORKFLOW_TABLES:
        deleted = conn.execute(delete(table).where(table.c[column].in_(ids))).rowcount
        counts.rows[table.name] = deleted
    counts.workflows = len(ids)
    return counts


def count_prunable(conn: Connection, cutoff: datetime) -> PruneCounts:
    """What a prune with this cutoff would delete now (nothing is locked or changed)."""
    w = t.workflows
    ids = select(w.c.id).where(_prunable(cutoff)).scalar_subquery()
    counts = PruneCounts()
    for table, column in WORKFLOW_TABLES:
        n = conn.execute(select(func.count()).where(table.c[column].in_(ids))).scalar_one()
        counts.rows[table.name] = int(n)
    counts.workflows = counts.rows[t.workflows.name]
    counts.reconciler_passes = len(_old_passes(conn, cutoff, None))
    return counts


def _old_passes(conn: Connection, cutoff: datetime, limit: int | None) -> list[int]:
    """Finished passes that started before `cutoff`, oldest first, never the newest
    finished one (the next pass starts from its start time)."""
    p = t.reconciler_passes
    newest = (
        select(p.c.id)
        .where(p.c.finished_at.is_not(None))
        .order_by(p.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    query = (
        select(p.c.id)
        .where(p.c.finished_at.is_not(None), p.c.started_at < cutoff, p.c.id < newest)
        .order_by(p.c.id)
        .limit(limit)
    )
    return list(conn.execute(query).scalars())


def prune_passes_batch(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` reconciler pass summaries older than `cutoff`."""
    ids = _old_passes(conn, cutoff, limit)
    if not ids:
        return 0
    p = t.reconciler_passes
    return int(conn.execute(delete(p).where(p.c.id.in_(ids))).rowcount)


def prune(
    engine: Engine,
    cutoff: datetime,
    batch_size: int,
    *,
    archive: Archiver | None = None,
    before_commit: Callable[[], None] | None = None,
    on_batch: Callable[[PruneCounts, PruneCounts], None] | None = None,
) -> PruneCounts:
    """Prune everything prunable at `cutoff`, `batch_size` workflows per transaction, then
    the old reconciler passes. `before_commit` runs after a batch's archive lines were
    handed over and before its deletes commit (an archive file syncs there), so a crash
    can archive a workflow twice but never delete one that was not archived. `on_batch`
    gets each batch's counts and the running total."""
    total = PruneCounts()
    while True:
        with engine.begin() as conn:
            batch = prune_batch(conn, cutoff, batch_size, archive)
            if batch.workflows and before_commit is not None:
                before_commit()
        total.add(batch)
        if on_batch is not None and batch.workflows:
            on_batch(batch, total)
        # SKIP LOCKED passes over held rows and LIMIT counts the rest, so a short batch
        # means nothing unlocked is left; a held workflow waits for the next run.
        if batch.workflows < batch_size:
            break
    while True:
        with engine.begin() as conn:
            passes = prune_passes_batch(conn, cutoff, batch_size)
        total.reconciler_passes += passes
        if on_batch is not None and passes:
            on_batch(PruneCounts(reconciler_passes=passes), total)
        if passes < batch_size:
            break
    return total
