"""The ledger operations the engine uses: dispatch marking, consuming completion events,
and the sweeps that keep work moving when messages are lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update

from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.consume import CompletionEventView, consume_completions
from ledger.db import transaction
from ledger.model import ReadyStep
from ledger.operations import complete
from ledger.rules import Classification
from ledger.sweeps import (
    dispatch_undispatched,
    expire_leases,
    promote_due_retries,
    redispatch_stale,
)
from ledger.transitions import complete_step
from streamflow import Workflow
from tests.ledger.helpers import recount, states
from tests.workers import Emails, Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def fan() -> Workflow:
    return (
        Workflow.new("fan")
        .add("root", Noop.new())
        .add("mail", Emails.new(), deps=["root"])
        .add("log", Noop.new({}, priority=5), deps=["root"])
    )


def recoveries(engine: Engine, wid: str) -> list[dict[str, Any]]:
    r = t.recoveries
    with engine.connect() as conn:
        return [
            dict(x)
            for x in conn.execute(
                select(r.c.step, r.c.repair).where(r.c.workflow_id == wid).order_by(r.c.id)
            ).mappings()
        ]


def event(wid: str, step: str, status: str = "completed", attempt: int = 1) -> CompletionEventView:
    return CompletionEventView(wid, step, status, attempt, f"{wid}:{step}:{attempt}:{status}")


def test_complete_with_dispatch_marks_released_children(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    with transaction(engine) as conn:
        r = complete_step(conn, wid, "root", "completed", 1, dispatch=True, now=NOW)
    assert r.ready == (ReadyStep(wid, "mail", "emails", 3), ReadyStep(wid, "log", "default", 5))
    with transaction(engine) as conn:
        # Already dispatched: the dispatcher finds nothing more to send.
        assert dispatch_undispatched(conn, NOW) == ()


def test_dispatcher_sends_roots_once_highest_priority_first(engine: Engine) -> None:
    wf = Workflow.new("w").add("low", Noop.new()).add("high", Noop.new({}, priority=9))
    wid = Workflow.insert(wf, engine).id
    with transaction(engine) as conn:
        sent = dispatch_undispatched(conn, NOW)
    assert [s.step for s in sent if s.workflow_id == wid] == ["high", "low"]
    with transaction(engine) as conn:
        assert dispatch_undispatched(conn, NOW) == ()


def test_consuming_an_event_dispatches_undispatched_children_once(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    complete(engine, wid, "root", "completed", 1)  # the API path: nothing dispatched
    with transaction(engine) as conn:
        [first] = consume_completions(conn, [event(wid, "root")], NOW, "consumer")
    assert first.classification == "consumed"
    assert {r.step for r in first.ready} == {"mail", "log"}
    with transaction(engine) as conn:
        [again] = consume_completions(conn, [event(wid, "root")], NOW, "consumer")
    assert (again.classification, again.ready) == ("duplicate", ())


def test_consuming_repairs_a_release_that_was_not_applied(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    with engine.begin() as conn:  # a completion whose release was lost, made by hand
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == "root")
            .values(state="completed", attempt=1)
        )
        conn.execute(
            update(t.workflows)
            .where(t.workflows.c.id == wid)
            .values(available_count=0, completed_count=1)
        )
    with transaction(engine) as conn:
        [c] = consume_completions(conn, [event(wid, "root")], NOW, "consumer")
    assert set(c.repaired) == {"mail", "log"}
    assert states(engine, wid) == {"root": "completed", "mail": "available", "log": "available"}
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)
    assert [r["repair"] for r in recoveries(engine, wid)] == ["release", "release"]


def test_events_for_old_attempts_and_unknown_things(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    complete(engine, wid, "root", "retryable", {"e": 1})
    complete(engine, wid, "root", "completed", 1)
    with transaction(engine) as conn:
        got = consume_completions(
            conn,
            [
                event(wid, "root", "retryable", 1),
                event(wid, "ghost"),
                event("nope", "root"),
                event(wid, "root", "completed", 2),
            ],
            NOW,
            "consumer",
        )
    assert [c.classification for c in got] == ["late", "unmatched", "unmatched", "consumed"]


def test_due_retries_become_available_and_undispatched(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    complete(engine, wid, "root", "retryable", {"e": 1}, now=NOW, retry_at=NOW + timedelta(5))
    with transaction(engine) as conn:
        assert promote_due_retries(conn, NOW) == []
        assert promote_due_retries(conn, NOW + timedelta(days=6)) == [
            ReadyStep(wid, "root", "default", 0)
        ]
    assert states(engine, wid)["root"] == "available"
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)
    with transaction(engine) as conn:
        assert [s.step for s in dispatch_undispatched(conn, NOW) if s.workflow_id == wid] == [
            "root"
        ]


def test_expired_lease_becomes_a_retry_and_the_dead_workers_word_is_late(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    with transaction(engine) as conn:
        c = claim_step(conn, wid, "root", owner="dead", lease_seconds=10, now=NOW)
    assert isinstance(c, Claim)
    with transaction(engine) as conn:
        assert expire_leases(conn, NOW + timedelta(seconds=5)) == []
        [r] = expire_leases(conn, NOW + timedelta(seconds=11))
    assert (r.status, r.attempt) == ("retryable", 1)
    assert recoveries(engine, wid) == [{"step": "root", "repair": "lease_expired"}]
    late = complete(engine, wid, "root", "completed", 1, attempt=1, source="worker")
    assert late.classification is Classification.LATE
    with transaction(engine) as conn:
        assert [s.step for s in promote_due_retries(conn, NOW + timedelta(seconds=12))] == ["root"]
        again = claim_step(conn, wid, "root", owner="alive", lease_seconds=10, now=NOW)
    assert isinstance(again, Claim) and again.attempt == 2


def test_expired_lease_on_the_last_attempt_fails_and_cascades(engine: Engine) -> None:
    wf = Workflow.new("w").add("a", Noop.new({}, max_attempts=1)).add("b", Noop.new(), deps=["a"])
    wid = Workflow.insert(wf, engine).id
    with transaction(engine) as conn:
        claim_step(conn, wid, "a", owner="dead", lease_seconds=1, now=NOW)
    with transaction(engine) as conn:
        [r] = expire_leases(conn, NOW + timedelta(seconds=2))
    assert (r.status, r.cancelled, r.workflow_outcome) == ("failed", ("b",), "failed")


def test_a_renewed_or_finished_lease_is_not_expired(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    with transaction(engine) as conn:
        c = claim_step(conn, wid, "root", owner="w", lease_seconds=1, now=NOW)
    assert isinstance(c, Claim)
    complete(engine, wid, "root", "completed", 1, attempt=1)
    with transaction(engine) as conn:
        assert expire_leases(conn, NOW + timedelta(seconds=5)) == []
    assert not Workflow.get(engine, wid).steps["root"].needs_review


def test_stale_dispatch_is_sent_again_with_a_recovery_row(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    with transaction(engine) as conn:
        dispatch_undispatched(conn, NOW)
    with transaction(engine) as conn:
        assert redispatch_stale(conn, NOW + timedelta(seconds=5), timedelta(seconds=30)) == ()
        again = redispatch_stale(conn, NOW + timedelta(seconds=31), timedelta(seconds=30))
    assert [s.step for s in again if s.workflow_id == wid] == ["root"]
    assert recoveries(engine, wid) == [{"step": "root", "repair": "redispatch"}]


def test_a_dispatcher_pass_costs_the_same_few_statements_for_one_step_or_many(
    engine: Engine,
) -> None:
    from sqlalchemy import event as sa_event

    def statements_for(count: int) -> tuple[int, int]:
        for _ in range(count):
            Workflow.insert(fan(), engine)
        sent: list[str] = []

        def before(*args: Any) -> None:
            sent.append(args[2])

        with transaction(engine) as conn:
            sa_event.listen(conn, "before_cursor_execute", before)
            ready = dispatch_undispatched(conn, NOW)
        return len(ready), len(sent)

    one = statements_for(1)
    many = statements_for(12)
    assert (one[0], many[0]) == (1, 12)
    assert one[1] == many[1]
