"""An outcome whose consequences are plain releases is one statement on PostgreSQL
(`ledger.planned_outcome`); everything else takes the general path. Both must leave the
ledger exactly as the general path does, on either backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy import event as sa_event

from ledger import tables as t
from ledger.db import transaction
from ledger.jobs import complete_job
from ledger.model import ReadyStep
from ledger.transitions import complete_step
from streamflow import Workflow
from tests.ledger.helpers import recount, states
from tests.workers import Emails, Noop

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def fan() -> Workflow:
    return (
        Workflow.new("fan")
        .add("root", Noop.new())
        .add("mail", Emails.new(), deps=["root"])
        .add("log", Noop.new({}, priority=5), deps=["root"])
        .add("join", Noop.new(), deps=["mail", "log"])
    )


def dispatched(engine: Engine, wid: str) -> dict[str, bool]:
    s = t.steps
    with engine.connect() as conn:
        rows = conn.execute(select(s.c.name, s.c.dispatched_at).where(s.c.workflow_id == wid)).all()
    return {name: at is not None for name, at in rows}


def counters(engine: Engine, wid: str) -> dict[str, int]:
    return Workflow.get(engine, wid).counters.as_dict()


def run(engine: Engine, wid: str, step: str, status: str, payload: Any = 1, **kw: Any) -> Any:
    with transaction(engine) as conn:
        return complete_step(conn, wid, step, status, payload, now=NOW, **kw)


def claim_all(engine: Engine, wid: str, *names: str) -> None:
    s = t.steps
    with transaction(engine) as conn:
        for name in names:
            conn.execute(
                s.update()
                .where(s.c.workflow_id == wid, s.c.name == name)
                .values(state="executing", attempt=1)
            )
            w = t.workflows
            conn.execute(
                w.update()
                .where(w.c.id == wid)
                .values(
                    available_count=w.c.available_count - 1,
                    executing_count=w.c.executing_count + 1,
                )
            )


def test_a_release_with_a_hand_off_leaves_only_that_child_undispatched(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    claim_all(engine, wid, "root")
    r = run(engine, wid, "root", "completed", dispatch=True, hand_off_queues=("default",))
    assert r.hand_off == ReadyStep(wid, "log", "default", 5)
    assert r.ready == (ReadyStep(wid, "mail", "emails", 3),)
    assert r.released == ("mail", "log")
    assert states(engine, wid) == {
        "root": "completed",
        "mail": "available",
        "log": "available",
        "join": "pending",
    }
    assert dispatched(engine, wid) == {"root": False, "mail": True, "log": False, "join": False}
    assert counters(engine, wid) == recount(engine, wid)


def test_the_api_path_releases_without_dispatching(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    claim_all(engine, wid, "root")
    r = run(engine, wid, "root", "completed")
    assert r.ready == () and r.hand_off is None and r.released == ("mail", "log")
    assert not any(dispatched(engine, wid).values())
    assert counters(engine, wid) == recount(engine, wid)


def test_a_fan_in_releases_once_the_last_parent_finishes_and_the_last_step_ends_it(
    engine: Engine,
) -> None:
    wid = Workflow.insert(fan(), engine).id
    claim_all(engine, wid, "root")
    run(engine, wid, "root", "completed", dispatch=True)
    claim_all(engine, wid, "mail", "log")
    assert run(engine, wid, "mail", "completed", dispatch=True).released == ()
    assert states(engine, wid)["join"] == "pending"
    assert run(engine, wid, "log", "completed", dispatch=True).released == ("join",)
    claim_all(engine, wid, "join")
    last = run(engine, wid, "join", "completed", dispatch=True)
    assert last.workflow_outcome == "completed"
    assert counters(engine, wid) == recount(engine, wid)
    record = Workflow.get(engine, wid)
    assert record.state == "finished" and record.outcome == "completed"


def test_a_failure_that_cancels_children_takes_the_general_path(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    claim_all(engine, wid, "root")
    r = run(engine, wid, "root", "failed", dispatch=True)
    assert set(r.cancelled) == {"mail", "log", "join"}
    assert r.workflow_outcome == "failed"
    assert counters(engine, wid) == recount(engine, wid)


def count_statements(conn: Connection) -> list[str]:
    sent: list[str] = []

    def before(_c: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    sa_event.listen(conn, "before_cursor_execute", before)
    return sent


def test_a_release_costs_three_statements_on_postgres(pg_engine: Engine) -> None:
    wid = Workflow.insert(fan(), pg_engine).id
    claim_all(pg_engine, wid, "root")
    with transaction(pg_engine) as conn:
        sent = count_statements(conn)
        r = complete_step(conn, wid, "root", "completed", 1, now=NOW, dispatch=True)
    assert r.released == ("mail", "log")
    # The workflow lock, the step with its history and its children, and the write.
    assert len(sent) == 3, "\n".join(sent)


def chain() -> Workflow:
    return (
        Workflow.new("chain", workflow_context={"tenant": 7})
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("c", Noop.new({"a": Workflow.result("a"), "b": Workflow.result("b")}), deps=["a", "b"])
    )


def test_the_hand_off_is_claimed_by_the_outcome_with_every_parent_result(engine: Engine) -> None:
    wid = Workflow.insert(chain(), engine).id
    claim_all(engine, wid, "a", "b")
    run(engine, wid, "a", "completed", payload={"from": "a"}, dispatch=True)
    with transaction(engine) as conn:
        r = complete_job(
            conn,
            "step",
            wid,
            "b",
            "completed",
            [1, 2],
            attempt=1,
            source="worker",
            now=NOW,
            dispatch=True,
            hand_off_queues=("default",),
            hand_off_owner="w1",
            hand_off_lease_seconds=60,
        )
    claim = r.hand_off_claim
    assert claim is not None and r.ready == () and r.released == ("c",)
    assert (claim.step, claim.attempt, claim.lease_owner) == ("c", 1, "w1")
    assert claim.lease_expires_at == NOW + timedelta(seconds=60)
    assert claim.args == {"a": {"from": "a"}, "b": [1, 2]}
    assert claim.dependency_results == {"a": {"from": "a"}, "b": [1, 2]}
    assert (claim.workflow_name, claim.workflow_context) == ("chain", {"tenant": 7})
    assert claim.available_at == NOW
    assert states(engine, wid)["c"] == "executing"
    assert not dispatched(engine, wid)["c"]
    assert counters(engine, wid) == recount(engine, wid)
    s = t.steps
    with engine.connect() as conn:
        lease = conn.execute(
            select(s.c.attempt, s.c.lease_owner, s.c.lease_expires_at).where(
                s.c.workflow_id == wid, s.c.name == "c"
            )
        ).one()
    assert (lease.attempt, lease.lease_owner) == (1, "w1")
    assert lease.lease_expires_at.replace(tzinfo=UTC) == claim.lease_expires_at


def test_an_outcome_that_claims_its_hand_off_is_still_three_statements_on_postgres(
    pg_engine: Engine,
) -> None:
    wid = Workflow.insert(chain(), pg_engine).id
    claim_all(pg_engine, wid, "a", "b")
    run(pg_engine, wid, "a", "completed", dispatch=True)
    with transaction(pg_engine) as conn:
        sent = count_statements(conn)
        r = complete_step(
            conn,
            wid,
            "b",
            "completed",
            2,
            attempt=1,
            now=NOW,
            dispatch=True,
            hand_off_queues=("default",),
            hand_off_owner="w1",
        )
    assert r.hand_off_claim is not None and r.hand_off_claim.dependency_results == {
        "a": 1,
        "b": 2,
    }
    assert len(sent) == 3, "\n".join(sent)
