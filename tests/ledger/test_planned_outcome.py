"""An outcome whose consequences are plain releases is one statement on PostgreSQL
(`ledger.planned_outcome`); everything else takes the general path. Both must leave the
ledger exactly as the general path does, on either backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
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


# -- several children handed off by one outcome ------------------------------------------------


def wide() -> Workflow:
    """root -> five children of the served queue (c4 the most urgent), one elsewhere."""
    wf = Workflow.new("wide").add("root", Noop.new({"n": 0}))
    for n in range(5):
        wf = wf.add(f"c{n}", Noop.new({"n": n}, priority=9 if n == 4 else 0), deps=["root"])
    return wf.add("other", Emails.new(), deps=["root"])


def finish_root(engine: Engine, wid: str, limit: int, owner: str | None = "w1") -> Any:
    with transaction(engine) as conn:
        return complete_job(
            conn,
            "step",
            wid,
            "root",
            "completed",
            {"from": "root"},
            attempt=1,
            source="worker",
            now=NOW,
            dispatch=True,
            hand_off_queues=("default",),
            hand_off_owner=owner,
            hand_off_lease_seconds=60,
            hand_off_limit=limit,
        )


def test_an_outcome_hands_off_up_to_its_limit_most_urgent_first(engine: Engine) -> None:
    """A worker with idle slots takes as many released children as it can run at once, in
    the outcome's transaction: each an ordinary claim, none published. The rest are
    dispatched as usual, and a queue the worker does not serve is never handed to it."""
    wid = Workflow.insert(wide(), engine).id
    claim_all(engine, wid, "root")
    r = finish_root(engine, wid, limit=3)
    assert r.hand_off == ReadyStep(wid, "c4", "default", 9)
    assert r.hand_off_claim is not None and r.hand_off_claim.step == "c4"
    assert [h.step for h in r.extra_hand_offs] == ["c0", "c1"]
    claims = [r.hand_off_claim, *r.extra_hand_off_claims]
    assert [(c.step, c.attempt, c.lease_owner) for c in claims] == [
        ("c4", 1, "w1"),
        ("c0", 1, "w1"),
        ("c1", 1, "w1"),
    ]
    assert all(c.lease_expires_at == NOW + timedelta(seconds=60) for c in claims)
    assert all(c.dependency_results == {"root": {"from": "root"}} for c in claims)
    assert [c.args for c in claims] == [{"n": 4}, {"n": 0}, {"n": 1}]
    assert sorted(r.step for r in r.ready) == ["c2", "c3", "other"]
    assert states(engine, wid) == {
        "root": "completed",
        **{f"c{n}": "executing" for n in (4, 0, 1)},
        **{f"c{n}": "available" for n in (2, 3)},
        "other": "available",
    }
    assert dispatched(engine, wid) == {
        "root": False,
        **{f"c{n}": n in (2, 3) for n in range(5)},
        "other": True,
    }
    assert counters(engine, wid) == recount(engine, wid)


def test_a_limit_above_the_children_takes_them_all_and_publishes_none_of_them(
    engine: Engine,
) -> None:
    wid = Workflow.insert(wide(), engine).id
    claim_all(engine, wid, "root")
    r = finish_root(engine, wid, limit=10)
    assert len(r.extra_hand_off_claims) == 4 and r.hand_off_claim is not None
    assert [x.step for x in r.ready] == ["other"]
    assert counters(engine, wid) == recount(engine, wid)


def test_without_an_owner_the_extra_hand_offs_are_left_for_the_caller(engine: Engine) -> None:
    """`complete_step` alone leaves every hand-off undispatched and unclaimed, as it does
    the first one: the caller claims them in its transaction."""
    wid = Workflow.insert(wide(), engine).id
    claim_all(engine, wid, "root")
    with transaction(engine) as conn:
        r = complete_step(
            conn,
            wid,
            "root",
            "completed",
            1,
            now=NOW,
            dispatch=True,
            hand_off_queues=("default",),
            hand_off_limit=2,
        )
    assert r.hand_off is not None and r.hand_off.step == "c4" and r.hand_off_claim is None
    assert [h.step for h in r.extra_hand_offs] == ["c0"] and r.extra_hand_off_claims == ()
    assert not dispatched(engine, wid)["c0"] and not dispatched(engine, wid)["c4"]
    assert sorted(x.step for x in r.ready) == ["c1", "c2", "c3", "other"]


def test_a_hand_off_limit_must_be_positive(engine: Engine) -> None:
    wid = Workflow.insert(wide(), engine).id
    claim_all(engine, wid, "root")
    with pytest.raises(ValueError, match="hand_off_limit"):
        finish_root(engine, wid, limit=0)
    assert states(engine, wid)["root"] == "executing", "nothing was written"
