"""Locking a group's workflows in one statement (PostgreSQL): the worker's group commit
locks every workflow its operations touch at once, and an operation's own
`lock_workflow` then costs nothing while the row handed to it is known to be current."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, Engine, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError

from ledger import tables as t
from ledger.claims import Claim, ClaimRefused, claim_read_ahead, claim_step
from ledger.db import (
    PRELOCKED,
    READ_AHEAD,
    READ_AHEAD_BY_WORKFLOW,
    lock_workflow,
    locked_with_reads,
    transaction,
    workflows_locked,
)
from ledger.errors import WorkflowNotFoundError
from ledger.transitions import complete_step, outcome_read_ahead
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


def test_a_lone_operation_and_sqlite_take_no_group_lock(
    pg_engine: Engine, sqlite_engine: Engine
) -> None:
    """One operation: its own lock is as cheap, so nothing runs up front."""
    wid = _insert(pg_engine, 1)[0]
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with workflows_locked(conn, [wid]):
            assert sent == [] and PRELOCKED not in conn.info
    ids = _insert(sqlite_engine, 2)
    with transaction(sqlite_engine) as conn:
        sent = _listen(conn)
        with workflows_locked(conn, ids):
            assert sent == []


def _chain(n: int) -> Workflow:
    return Workflow.new(f"c{n}").add("a", Noop.new({"n": n})).add("b", Noop.new(), deps=["a"])


def _fresh(conn: Connection, workflow_id: str) -> dict[str, object]:
    row = conn.execute(
        text("SELECT * FROM streamflow_workflows WHERE id = :i"), {"i": workflow_id}
    ).mappings()
    return dict(row.one())


def test_an_outcome_hands_the_row_it_wrote_to_the_next_operation_of_its_workflow(
    pg_engine: Engine,
) -> None:
    """Two operations of one workflow in a group (a claim's step finishing, then its
    sibling's claim, say): the outcome's statement knows the row it left, so the next
    operation's lock needs no statement either — and sees every counter the outcome moved.
    """
    wid = Workflow.insert(_chain(1), pg_engine).id
    with transaction(pg_engine) as conn:
        claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
    with transaction(pg_engine) as conn, workflows_locked(conn, [wid, wid]):
        done = complete_step(
            conn, wid, "a", "completed", 1, attempt=1, source="worker", now=NOW, dispatch=True
        )
        assert done.applied and [r.step for r in done.ready] == ["b"]
        sent = _listen(conn)
        row = lock_workflow(conn, wid)
        assert sent == []
        assert row == _fresh(conn, wid)
        assert (row["available_count"], row["completed_count"]) == (1, 1)


def test_a_claim_hands_on_the_row_it_left(pg_engine: Engine) -> None:
    wid = Workflow.insert(_chain(2), pg_engine).id
    with transaction(pg_engine) as conn, workflows_locked(conn, [wid, wid]):
        assert isinstance(claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW), Claim)
        sent = _listen(conn)
        row = lock_workflow(conn, wid)
        assert sent == []
        assert row == _fresh(conn, wid) and row["executing_count"] == 1


def test_a_claim_under_its_callers_lock_drops_what_was_handed_on(pg_engine: Engine) -> None:
    """A claim made under a lock its caller holds skips `lock_workflow`; unless it hands
    on a row of its own, the next operation must read."""
    wid = Workflow.insert(_chain(3), pg_engine).id
    with transaction(pg_engine) as conn:
        claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
    with transaction(pg_engine) as conn, workflows_locked(conn, [wid, wid, wid]):
        complete_step(conn, wid, "a", "completed", 1, attempt=1, source="worker", now=NOW)
        refused = claim_step(
            conn, wid, "a", owner="w2", lease_seconds=30, now=NOW, workflow_locked=True
        )
        assert not isinstance(refused, Claim)
        sent = _listen(conn)
        row = lock_workflow(conn, wid)
        assert len(sent) == 1
        assert row == _fresh(conn, wid)


def test_an_outcome_outside_a_group_leaves_nothing_behind(pg_engine: Engine) -> None:
    wid = Workflow.insert(_chain(3), pg_engine).id
    with transaction(pg_engine) as conn:
        claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
        complete_step(conn, wid, "a", "completed", 1, attempt=1, source="worker", now=NOW)
        assert PRELOCKED not in conn.info


# -- outcomes read ahead with the locks ----------------------------------------------------------


def _fan_in(engine: Engine) -> str:
    wf = (
        Workflow.new("fan-in")
        .add("p1", Noop.new())
        .add("p2", Noop.new())
        .add("join", Noop.new(), deps=["p1", "p2"])
    )
    wid = Workflow.insert(wf, engine).id
    with transaction(engine) as conn:
        for step in ("p1", "p2"):
            claim_step(conn, wid, step, owner="w1", lease_seconds=30, now=NOW)
    return wid


def outcomes_locked(
    conn: Connection, ids: list[str], steps: list[str | None]
) -> AbstractContextManager[None]:
    """The worker's group scope for outcomes of these steps (None: another operation)."""
    reads = [
        None if s is None else outcome_read_ahead(w, s) for w, s in zip(ids, steps, strict=True)
    ]
    return locked_with_reads(conn, ids, reads)


def _finish(conn: Connection, wid: str, step: str) -> object:
    return complete_step(
        conn, wid, step, "completed", 1, attempt=1, source="worker", now=NOW, dispatch=True
    )


def test_each_workflows_first_outcome_is_read_with_the_groups_locks(pg_engine: Engine) -> None:
    """The outcome's read (the step, its history, its children) goes out with the group's
    lock, so each outcome sends only its write."""
    ids = _insert(pg_engine, 3)
    with transaction(pg_engine) as conn:
        for wid in ids:
            claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with outcomes_locked(conn, ids, ["a", "a", "a"]):
            read_ahead = set(sent[1:])
            assert len(sent) == 4 and len(read_ahead) == 1, "one lock, three reads"
            done = [_finish(conn, wid, "a") for wid in ids]
            assert not read_ahead & set(sent[4:]), "an outcome read its step again"
            assert len(sent) == 7
    assert all(d.applied and d.status == "completed" for d in done)  # type: ignore[attr-defined]
    with pg_engine.connect() as conn:
        assert all(_fresh(conn, wid)["state"] == "finished" for wid in ids)


def test_a_second_outcome_of_a_workflow_reads_what_the_first_wrote(pg_engine: Engine) -> None:
    """Both parents of a fan-in finish in one group: read ahead, the second would still
    see the first executing and the join would wait forever. Only a workflow's first
    operation gets what was read ahead."""
    wid = _fan_in(pg_engine)
    with transaction(pg_engine) as conn, outcomes_locked(conn, [wid, wid], ["p1", "p2"]):
        first = _finish(conn, wid, "p1")
        second = _finish(conn, wid, "p2")
    assert first.released == ()  # type: ignore[attr-defined]
    assert [r.step for r in second.ready] == ["join"]  # type: ignore[attr-defined]


def test_what_was_read_ahead_goes_only_to_its_own_operation(pg_engine: Engine) -> None:
    """Read ahead for p1, but the workflow's first operation is another one (p2's
    outcome): p1's outcome, after it, must read afresh."""
    wid = _fan_in(pg_engine)
    with transaction(pg_engine) as conn, outcomes_locked(conn, [wid, wid], ["p1", None]):
        assert _finish(conn, wid, "p2").released == ()  # type: ignore[attr-defined]
        released = _finish(conn, wid, "p1")
        assert [r.step for r in released.ready] == ["join"]  # type: ignore[attr-defined]


def test_a_lone_outcome_sends_its_own_lock_and_read(pg_engine: Engine) -> None:
    """One operation: nothing goes out up front (a pipeline of two statements measured
    slower than the two), and its outcome is made as outside any group."""
    ids = _insert(pg_engine, 1)
    with transaction(pg_engine) as conn:
        claim_step(conn, ids[0], "a", owner="w1", lease_seconds=30, now=NOW)
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with outcomes_locked(conn, ids, ["a"]):
            assert sent == [] and READ_AHEAD_BY_WORKFLOW not in conn.info
            assert _finish(conn, ids[0], "a").applied  # type: ignore[attr-defined]
            assert len(sent) == 3, "\n".join(sent)


def test_nothing_read_ahead_is_left_on_the_connection(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 2)
    with transaction(pg_engine) as conn:
        with outcomes_locked(conn, ids, ["a", None]):
            lock_workflow(conn, ids[0])  # given the read, never used
            lock_workflow(conn, ids[1])
            assert conn.info.get(READ_AHEAD) is None, "another workflow's read lingers"
        assert READ_AHEAD not in conn.info


def _claims_locked(conn: Connection, ids: list[str], step: str) -> AbstractContextManager[None]:
    reads = [claim_read_ahead(w, step, "w1", 30, NOW) for w in ids]
    return locked_with_reads(conn, ids, list(reads))


def test_each_workflows_first_claim_is_made_with_the_groups_locks(pg_engine: Engine) -> None:
    ids = _insert(pg_engine, 2)
    with transaction(pg_engine) as conn:
        sent = _listen(conn)
        with _claims_locked(conn, ids, "a"):
            assert len(sent) == 3, "one lock, two takes"
            claims = [
                claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW) for wid in ids
            ]
            assert len(sent) == 3, "a claim took its step again"
            assert all(lock_workflow(conn, wid) == _fresh(conn, wid) for wid in ids)
    assert [(c.step, c.attempt) for c in claims if isinstance(c, Claim)] == [("a", 1)] * 2


def test_a_claim_made_ahead_that_finds_its_step_taken_is_refused_and_recorded(
    pg_engine: Engine,
) -> None:
    wid, other = _insert(pg_engine, 2)
    with transaction(pg_engine) as conn:
        claim_step(conn, wid, "a", owner="w0", lease_seconds=30, now=NOW)
    with transaction(pg_engine) as conn, _claims_locked(conn, [wid, other], "a"):
        refused = claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
    assert isinstance(refused, ClaimRefused) and refused.verdict.value == "duplicate"
    with pg_engine.connect() as conn:
        kinds = conn.execute(
            text("SELECT classification FROM streamflow_evidence WHERE workflow_id = :w"),
            {"w": wid},
        ).scalars()
        assert list(kinds) == ["duplicate"]


def test_a_claim_with_another_now_than_its_read_ahead_takes_its_step_itself(
    pg_engine: Engine,
) -> None:
    """What was sent ahead is keyed by every parameter: a claim made differently does
    not take a claim it did not ask for (here the step is already taken by the ahead
    one, so the claim is refused: the mismatch is visible, never silent)."""
    wid, other = _insert(pg_engine, 2)
    later = NOW.replace(minute=1)
    with transaction(pg_engine) as conn, _claims_locked(conn, [wid, other], "a"):
        refused = claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=later)
    assert isinstance(refused, ClaimRefused)
