"""Pruning: finished workflows older than the cutoff go with every row they own, in
batches; running workflows, young ones and those whose callback may still run stay. On
PostgreSQL a batch skips a workflow another transaction holds instead of waiting for it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from ledger import tables as t
from ledger.callback_jobs import claim_callback, complete_callback
from ledger.claims import Claim
from ledger.db import lock_workflow, read
from ledger.prune import WORKFLOW_TABLES, PruneCounts, count_prunable, prune
from ledger.recoveries import record_recovery
from streamflow import Workflow
from tests.workers import Noop

NOW = datetime.now(UTC)
CUTOFF = NOW - timedelta(days=30)


def _wf(*, on_finish: bool = False, await_signal: bool = False) -> Workflow:
    wf = Workflow.new(name="prunable", on_finish=Noop.new({}) if on_finish else None)
    wf = wf.add("a", Noop.new({})).add("b", Noop.new({}), deps=["a"])
    if await_signal:
        wf = wf.add("c", Noop.new({}), deps=["b"], await_signal="go")
    return wf


def _finish(engine: Engine, wid: str, steps: list[str]) -> None:
    for step in steps:
        Workflow.complete_step(engine, wid, step, status="completed", payload={"step": step})


def _age(engine: Engine, wid: str, days: float) -> None:
    """Pretend the workflow finished `days` ago."""
    when = NOW - timedelta(days=days)
    with engine.begin() as conn:
        conn.execute(update(t.workflows).where(t.workflows.c.id == wid).values(finished_at=when))


def full_workflow(engine: Engine, days: float) -> str:
    """A finished workflow with rows in every per-workflow table."""
    wid = Workflow.insert(_wf(on_finish=True, await_signal=True), engine).id
    _finish(engine, wid, ["a", "b"])
    Workflow.signal(engine, wid, "go", {"ok": True})
    _finish(engine, wid, ["c"])
    Workflow.complete_step(engine, wid, "c", status="completed")  # a duplicate: evidence
    with engine.begin() as conn:
        claim = claim_callback(conn, wid, owner="w", lease_seconds=30, now=NOW)
        assert isinstance(claim, Claim)
        complete_callback(conn, wid, payload=None, attempt=claim.attempt, now=NOW)
        record_recovery(
            conn, workflow_id=wid, step="a", repair="redispatch", reason="test", now=NOW
        )
    Workflow.cancel(engine, wid, reason="after the fact")  # kept as a request: finished
    _age(engine, wid, days)
    return wid


def rows_of(engine: Engine, wid: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(
                select(func.count()).select_from(table).where(table.c[column] == wid)
            ).scalar_one()
            for table, column in WORKFLOW_TABLES
        }


def test_an_old_finished_workflow_goes_with_every_row_it_owns(engine: Engine) -> None:
    old = full_workflow(engine, days=40)
    young = full_workflow(engine, days=10)
    before_old, before_young = rows_of(engine, old), rows_of(engine, young)
    # The fixture really has a row in every table, so every table's delete is exercised.
    assert all(n > 0 for n in before_old.values()), before_old

    with read(engine) as conn:
        dry = count_prunable(conn, CUTOFF)
    assert dry.workflows == 1
    assert dry.rows == before_old
    assert rows_of(engine, old) == before_old  # a dry run changes nothing

    done = prune(engine, CUTOFF, batch_size=10)
    assert done.workflows == 1
    assert done.rows == before_old
    assert all(n == 0 for n in rows_of(engine, old).values())
    assert rows_of(engine, young) == before_young


def test_running_workflows_and_live_callbacks_are_never_touched(engine: Engine) -> None:
    running = Workflow.insert(_wf(), engine).id
    _finish(engine, running, ["a"])
    with engine.begin() as conn:  # started long ago, still running
        conn.execute(
            update(t.workflows)
            .where(t.workflows.c.id == running)
            .values(created_at=NOW - timedelta(days=90))
        )
    waiting_callback = Workflow.insert(_wf(on_finish=True), engine).id
    _finish(engine, waiting_callback, ["a", "b"])
    _age(engine, waiting_callback, 40)
    assert Workflow.callback(engine, waiting_callback) is not None
    before = {wid: rows_of(engine, wid) for wid in (running, waiting_callback)}

    assert prune(engine, CUTOFF, batch_size=10).workflows == 0
    assert {wid: rows_of(engine, wid) for wid in before} == before

    # Once the callback has run, the workflow may go.
    with engine.begin() as conn:
        claim = claim_callback(conn, waiting_callback, owner="w", lease_seconds=30, now=NOW)
        assert isinstance(claim, Claim)
        complete_callback(conn, waiting_callback, payload=None, attempt=claim.attempt, now=NOW)
    assert prune(engine, CUTOFF, batch_size=10).workflows == 1
    assert rows_of(engine, running) == before[running]


def test_batches_take_the_oldest_first_and_report_progress(engine: Engine) -> None:
    ids = []
    for days in (50, 45, 40, 35, 31):
        wid = Workflow.insert(_wf(), engine).id
        _finish(engine, wid, ["a", "b"])
        _age(engine, wid, days)
        ids.append(wid)
    seen: list[tuple[int, int]] = []
    gone: list[set[str]] = []

    def on_batch(batch: PruneCounts, total: PruneCounts) -> None:
        seen.append((batch.workflows, total.workflows))
        with engine.connect() as conn:
            gone.append(set(ids) - set(conn.execute(select(t.workflows.c.id)).scalars()))

    total = prune(engine, CUTOFF, batch_size=2, on_batch=on_batch)
    assert seen == [(2, 2), (2, 4), (1, 5)]
    # Each batch committed on its own, oldest finish first.
    assert gone == [set(ids[:2]), set(ids[:4]), set(ids)]
    assert total.rows["streamflow_steps"] == 10


def test_the_archive_gets_every_row_before_the_delete(engine: Engine) -> None:
    wid = full_workflow(engine, days=40)
    before = rows_of(engine, wid)
    lines: list[dict[str, Any]] = []
    synced: list[int] = []

    prune(
        engine,
        CUTOFF,
        batch_size=10,
        archive=lines.append,
        before_commit=lambda: synced.append(len(lines)),
    )
    (line,) = lines
    assert synced == [1]
    assert line["workflow_id"] == wid
    assert line["workflow"]["id"] == wid and line["workflow"]["state"] == "finished"
    for table, _ in WORKFLOW_TABLES:
        if table is not t.workflows:
            key = table.name.removeprefix("streamflow_")
            assert len(line[key]) == before[table.name], key
    assert {s["name"] for s in line["steps"]} == {"a", "b", "c"}


def test_a_failing_archive_deletes_nothing(engine: Engine) -> None:
    wid = full_workflow(engine, days=40)
    before = rows_of(engine, wid)

    def broken(_: dict[str, Any]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prune(engine, CUTOFF, batch_size=10, archive=broken)
    assert rows_of(engine, wid) == before


def test_old_reconciler_passes_go_but_the_newest_stays(engine: Engine) -> None:
    p = t.reconciler_passes
    with engine.begin() as conn:
        for days in (60, 50, 40):
            when = NOW - timedelta(days=days)
            conn.execute(insert(p).values(host="h", started_at=when, finished_at=when))
        # An unfinished one (a pass that died) and the newest finished one, both old.
        conn.execute(insert(p).values(host="h", started_at=NOW - timedelta(days=39)))
        conn.execute(
            insert(p).values(
                host="h", started_at=NOW - timedelta(days=38), finished_at=NOW - timedelta(days=38)
            )
        )
    assert prune(engine, CUTOFF, batch_size=2).reconciler_passes == 3
    with engine.connect() as conn:
        left = conn.execute(select(p.c.started_at, p.c.finished_at).order_by(p.c.id)).all()
    assert len(left) == 2
    assert left[0].finished_at is None  # never finished: not a summary to prune
    assert left[1].finished_at is not None  # the newest: the next pass starts from it


@pytest.mark.postgres
def test_a_batch_skips_a_workflow_held_by_a_running_transaction(pg_engine: Engine) -> None:
    held, free = (full_workflow(pg_engine, days=40) for _ in range(2))
    holder = pg_engine.connect()
    holder.begin()
    lock_workflow(holder, held)  # what every transition of the workflow takes first
    result: list[PruneCounts] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(prune(pg_engine, CUTOFF, batch_size=10))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        thread.join(timeout=20)
        finished_while_held = not thread.is_alive()
    finally:
        holder.rollback()
        holder.close()
        thread.join(timeout=20)
    assert finished_while_held, "prune waited on a workflow held by another transaction"
    assert not errors, errors
    assert result[0].workflows == 1
    assert all(n == 0 for n in rows_of(pg_engine, free).values())
    assert rows_of(pg_engine, held)["streamflow_workflows"] == 1
    # Released, it goes on the next run.
    assert prune(pg_engine, CUTOFF, batch_size=10).workflows == 1
