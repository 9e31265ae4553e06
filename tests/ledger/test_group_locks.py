"""Locking a group's workflows in one statement (PostgreSQL): the worker's group commit
locks every workflow its operations touch at once, and each operation's own
`lock_workflow` then costs nothing — once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError

from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.db import PRELOCKED, lock_workflow, transaction, workflows_locked
from ledger.errors import WorkflowNotFoundError
from streamflow import Workflow
from tests.workers import Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _one_step(n: int) -> Workflow:
    return Workflow.new(f"w{n}").add("a", Noop.new({"n": n}))


def _insert(engine: Engine, count: int) -> list[str]:
    return [Workflow.insert(_one_step(n), engine).id for n in range(count)]


def _listen(conn: object) -> list[str]:
    sent: list[str] = []
    sa_event.listen(conn, "before_cursor_execute", lambda *a: sent.append(a[2]))
    return sent


def test_each_workflow_of_the_group_is_locked_by_one_statement(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 3)
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with workflows_locked(conn, list(reversed(ids))):
            assert len(sent) == 1
            rows = [lock_workflow(conn, wid) for wid in ids]
            assert len(sent) == 1, "the operations' own locks ran statements"
            fresh = [
                dict(
                    conn.execute(
                        text("SELECT * FROM streamflow_workflows WHERE id = :i"), {"i": wid}
                    )
                    .mappings()
                    .one()
                )
                for wid in ids
            ]
    assert rows == fresh


def test_the_locks_are_held_until_the_transaction_ends(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 2)
    with (
        transaction(pg_engine) as conn,
        workflows_locked(conn, ids),
        pg_engine.connect() as other,
    ):
        for wid in ids:
            with pytest.raises(OperationalError, match="could not obtain lock"):
                other.execute(
                    text("SELECT id FROM streamflow_workflows WHERE id = :i FOR UPDATE NOWAIT"),
                    {"i": wid},
                )
            other.rollback()


def test_a_second_lock_of_one_workflow_reads_what_the_transaction_wrote(
    pg_engine: Engine,
) -> None:
    """Two operations of one group on one workflow: the second must see the first's
    changes, so only the first gets the row read before either ran."""
    ids = _insert(pg_engine, 2)
    w = t.workflows
    with transaction(pg_engine) as conn, workflows_locked(conn, ids):
        first = lock_workflow(conn, ids[0])
        conn.execute(update(w).where(w.c.id == ids[0]).values(available_count=41))
        second = lock_workflow(conn, ids[0])
    assert first["available_count"] != 41
    assert second["available_count"] == 41


def test_nothing_is_left_on_the_connection_after_the_group(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 2)
    with transaction(pg_engine) as conn:
        with workflows_locked(conn, ids):
            assert PRELOCKED in conn.info
        assert PRELOCKED not in conn.info
        sent = _listen(conn)
        lock_workflow(conn, ids[0])
        assert len(sent) == 1
    with (
        pytest.raises(RuntimeError),
        transaction(pg_engine) as conn,
        workflows_locked(conn, ids),
    ):
        raise RuntimeError("an operation failed")
    with transaction(pg_engine) as conn:
        assert PRELOCKED not in conn.info


def test_an_unknown_workflow_still_raises_in_its_own_operation(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 1)
    with transaction(pg_engine) as conn, workflows_locked(conn, [*ids, "nope"]):
        assert lock_workflow(conn, ids[0])["id"] == ids[0]
        with pytest.raises(WorkflowNotFoundError):
            lock_workflow(conn, "nope")


def test_a_claim_inside_a_locked_group_is_one_statement(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 2)
    with transaction(pg_engine) as conn, workflows_locked(conn, ids):
        sent = _listen(conn)
        claims = [claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW) for wid in ids]
    assert all(isinstance(c, Claim) for c in claims)
    assert len(sent) == 2, "\n".join(sent)


def test_a_lone_workflow_and_sqlite_take_no_group_lock(
    pg_engine: Engine, sqlite_engine: Engine
) -> None:
    """One workflow: its operation's own lock is as cheap, so nothing runs up front."""
    wid = _insert(pg_engine, 1)[0]
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with workflows_locked(conn, [wid, wid]):
            assert sent == [] and PRELOCKED not in conn.info
    ids = _insert(sqlite_engine, 2)
    with transaction(sqlite_engine) as conn:
        sent = _listen(conn)
        with workflows_locked(conn, ids):
            assert sent == []
