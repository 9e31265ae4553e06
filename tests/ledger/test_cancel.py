"""Cancel requests: every request kept, unfinished steps cancelled, leases revoked, the
outcome recorded separately. On SQLite and PostgreSQL; the races on PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger import tables as t
from ledger.claims import Claim, ClaimRefused, claim_step, renew_lease
from ledger.db import transaction
from ledger.operations import complete
from ledger.rules import ClaimVerdict, Classification
from streamflow import Dep, Workflow, WorkflowNotFoundError
from tests.ledger.helpers import evidence, recount, states
from tests.workers import Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def claim(engine: Engine, wid: str, step: str, owner: str = "w1") -> Claim:
    with transaction(engine) as conn:
        c = claim_step(conn, wid, step, owner=owner, lease_seconds=30, now=NOW)
    assert isinstance(c, Claim)
    return c


def every_state() -> Workflow:
    """Steps that end up completed, executing, retryable, available and pending."""
    return (
        Workflow.new("cancel_me")
        .add("done", Noop.new())
        .add("running", Noop.new())
        .add("flaky", Noop.new({}, max_attempts=3))
        .add("ready", Noop.new(), deps=["done"])
        .add("later", Noop.new(), deps=["running", "ready"])
        .add("cleanup", Noop.new(), deps=[Dep("later", policy="continue")])
    )


def started(engine: Engine) -> tuple[str, Claim]:
    wid = Workflow.insert(every_state(), engine).id
    Workflow.complete_step(engine, wid, "done", status="completed", payload={"ok": 1})
    running = claim(engine, wid, "running")
    Workflow.complete_step(engine, wid, "flaky", status="retryable", payload={"e": 1})
    assert states(engine, wid) == {
        "done": "completed",
        "running": "executing",
        "flaky": "retryable",
        "ready": "available",
        "later": "pending",
        "cleanup": "pending",
    }
    return wid, running


def cancel_rows(engine: Engine, wid: str) -> list[dict[str, Any]]:
    c = t.cancel_requests
    with engine.connect() as conn:
        rows = conn.execute(
            select(c.c.reason, c.c.requested_by, c.c.effect, c.c.cancelled_steps)
            .where(c.c.workflow_id == wid)
            .order_by(c.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def test_cancel_cancels_every_unfinished_step_and_records_the_outcome(engine: Engine) -> None:
    wid, _ = started(engine)
    result = Workflow.cancel(engine, wid, reason="customer left")
    assert result.effect == "applied" and result.applied
    assert result.cancelled == ("running", "flaky", "ready", "later", "cleanup")
    assert result.revoked == ("running",)
    assert result.workflow_outcome == "cancelled"
    record = Workflow.get(engine, wid)
    assert (record.state, record.outcome) == ("finished", "cancelled")
    assert record.finished_at is not None
    assert states(engine, wid) == {
        "done": "completed",
        "running": "cancelled",
        "flaky": "cancelled",
        "ready": "cancelled",
        "later": "cancelled",
        "cleanup": "cancelled",
    }
    for name in result.cancelled:
        step = record.steps[name]
        assert step.terminal_cause == "workflow_cancelled"
        assert step.cancelled_by_step is None and step.scheduled_at is None
    # Completed work stays completed, its result stored.
    assert Workflow.results(engine, wid) == {"done": {"ok": 1}}
    assert record.counters.as_dict() == recount(engine, wid)
    assert cancel_rows(engine, wid) == [
        {
            "reason": "customer left",
            "requested_by": "api",
            "effect": "applied",
            "cancelled_steps": 5,
        }
    ]


def test_the_running_attempt_is_recorded_cancelled_and_its_lease_revoked(engine: Engine) -> None:
    wid, running = started(engine)
    Workflow.cancel(engine, wid, reason="stop")
    with engine.connect() as conn:
        step = conn.execute(
            select(t.steps.c.lease_owner, t.steps.c.lease_expires_at, t.steps.c.attempt).where(
                t.steps.c.workflow_id == wid, t.steps.c.name == "running"
            )
        ).one()
        attempt = conn.execute(
            select(t.attempts.c.status, t.attempts.c.reason, t.attempts.c.source).where(
                t.attempts.c.workflow_id == wid,
                t.attempts.c.step == "running",
                t.attempts.c.attempt == running.attempt,
            )
        ).one()
    assert (step.lease_owner, step.lease_expires_at, step.attempt) == (None, None, 1)
    assert tuple(attempt) == ("cancelled", "workflow_cancelled", "api")
    # The worker's next renewal is refused: that is how it learns to stop.
    with transaction(engine) as conn:
        held = renew_lease(
            conn,
            wid,
            "running",
            owner=running.lease_owner,
            attempt=running.attempt,
            lease_seconds=30,
            now=NOW + timedelta(seconds=10),
        )
    assert held is False


def test_a_late_completion_from_the_running_worker_changes_nothing(engine: Engine) -> None:
    wid, running = started(engine)
    Workflow.cancel(engine, wid)
    before = Workflow.get(engine, wid)
    late = complete(engine, wid, "running", "completed", {"done": True}, attempt=running.attempt)
    assert late.classification is Classification.LATE
    assert late.reason == "step_cancelled"
    assert late.released == () and late.workflow_outcome is None
    # Reporting `cancelled` (the worker saw ctx.cancel_requested()) agrees: a duplicate.
    agrees = complete(engine, wid, "running", "cancelled", {"reason": "x"}, attempt=1)
    assert agrees.classification is Classification.DUPLICATE
    after = Workflow.get(engine, wid)
    assert after == before
    assert "running" not in Workflow.results(engine, wid)
    assert [(e["step"], e["classification"], e["reason"]) for e in evidence(engine, wid)] == [
        ("running", "late", "step_cancelled"),
        ("running", "duplicate", None),
    ]


@pytest.mark.parametrize("status", ["completed", "failed", "retryable"])
def test_any_outcome_reported_after_the_cancel_is_late(engine: Engine, status: str) -> None:
    wid, _ = started(engine)
    Workflow.cancel(engine, wid)
    for step in ("flaky", "ready"):
        r = complete(engine, wid, step, status, {"n": 1})
        assert r.classification is Classification.LATE
    assert Workflow.get(engine, wid).outcome == "cancelled"


def test_a_ready_message_for_a_cancelled_step_runs_nothing(engine: Engine) -> None:
    wid, _ = started(engine)
    Workflow.cancel(engine, wid)
    with transaction(engine) as conn:
        refused = claim_step(conn, wid, "ready", owner="w2", lease_seconds=30, now=NOW)
    assert isinstance(refused, ClaimRefused)
    assert refused.verdict is ClaimVerdict.LATE
    assert evidence(engine, wid)[-1]["classification"] == "late"


def test_every_request_is_kept_and_a_repeat_changes_nothing(engine: Engine) -> None:
    wid, _ = started(engine)
    first = Workflow.cancel(engine, wid, reason="one")
    before = Workflow.get(engine, wid)
    second = Workflow.cancel(engine, wid, reason="two")
    third = Workflow.cancel(engine, wid)
    assert (second.effect, second.cancelled, second.workflow_outcome) == (
        "repeated",
        (),
        "cancelled",
    )
    assert third.effect == "repeated"
    assert len({first.request_id, second.request_id, third.request_id}) == 3
    assert Workflow.get(engine, wid) == before
    assert [r["effect"] for r in cancel_rows(engine, wid)] == ["applied", "repeated", "repeated"]
    listed = Workflow.cancel_requests(engine, wid)
    assert [(r.reason, r.effect, r.cancelled_steps) for r in listed] == [
        ("one", "applied", 5),
        ("two", "repeated", 0),
        (None, "repeated", 0),
    ]


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_cancelling_a_finished_workflow_keeps_its_outcome(engine: Engine, outcome: str) -> None:
    wf = Workflow.new("short").add("a", Noop.new()).add("b", Noop.new(), deps=["a"])
    wid = Workflow.insert(wf, engine).id
    Workflow.complete_step(engine, wid, "a", status=outcome, payload=None)
    if outcome == "completed":
        Workflow.complete_step(engine, wid, "b", status="completed", payload=None)
    before = Workflow.get(engine, wid)
    assert before.outcome == outcome
    result = Workflow.cancel(engine, wid, reason="too late")
    assert (result.effect, result.cancelled, result.workflow_outcome) == ("finished", (), outcome)
    assert Workflow.get(engine, wid) == before
    assert cancel_rows(engine, wid) == [
        {"reason": "too late", "requested_by": "api", "effect": "finished", "cancelled_steps": 0}
    ]


def test_cancelling_an_unknown_workflow_raises_and_writes_nothing(engine: Engine) -> None:
    with pytest.raises(WorkflowNotFoundError):
        Workflow.cancel(engine, "0" * 32, reason="nope")
    with engine.connect() as conn:
        assert conn.execute(select(t.cancel_requests.c.id)).first() is None


def test_cancel_joins_the_callers_transaction(engine: Engine) -> None:
    wid, _ = started(engine)
    with engine.connect() as conn:
        conn.begin()
        result = Workflow.cancel(conn, wid, reason="in a transaction")
        assert result.applied
        conn.rollback()
    assert Workflow.get(engine, wid).state == "running"
    assert cancel_rows(engine, wid) == []


def test_a_cancel_request_gives_a_cancelled_outcome_even_if_a_step_had_failed(
    engine: Engine,
) -> None:
    wf = Workflow.new("mixed").add("a", Noop.new()).add("b", Noop.new())
    wid = Workflow.insert(wf, engine).id
    Workflow.complete_step(engine, wid, "a", status="failed", payload=None)
    assert Workflow.cancel(engine, wid).workflow_outcome == "cancelled"
    assert states(engine, wid) == {"a": "failed", "b": "cancelled"}


# -- races, on PostgreSQL ---------------------------------------------------------------------


@pytest.mark.postgres
def test_concurrent_cancels_apply_exactly_once(pg_engine: Engine) -> None:
    for _ in range(20):
        wid, _claim = started(pg_engine)
        barrier = threading.Barrier(6, timeout=10)

        def one(i: int, wid: str = wid, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return Workflow.cancel(pg_engine, wid, reason=f"r{i}").effect

        with ThreadPoolExecutor(6) as pool:
            effects = Counter(pool.map(one, range(6)))
        assert effects == Counter({"applied": 1, "repeated": 5})
        assert Workflow.get(pg_engine, wid).counters.as_dict() == recount(pg_engine, wid)


@pytest.mark.postgres
def test_a_cancel_racing_a_worker_completion_has_one_consistent_outcome(
    pg_engine: Engine,
) -> None:
    seen: Counter[str] = Counter()
    for _ in range(30):
        wid, _running = started(pg_engine)
        barrier = threading.Barrier(2, timeout=10)

        def finish(wid: str = wid, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            r = complete(pg_engine, wid, "running", "completed", {"r": 1}, attempt=1)
            return r.classification.value

        def cancel(wid: str = wid, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return Workflow.cancel(pg_engine, wid).effect

        with ThreadPoolExecutor(2) as pool:
            done_f, cancel_f = pool.submit(finish), pool.submit(cancel)
            done, effect = done_f.result(), cancel_f.result()
        assert effect == "applied"
        record = Workflow.get(pg_engine, wid)
        assert record.outcome == "cancelled"
        step = record.steps["running"]
        if done == "applied":
            # The worker committed first: its result stands, the cancel took the rest.
            assert step.state.value == "completed"
            assert Workflow.results(pg_engine, wid)["running"] == {"r": 1}
        else:
            assert done == "late"
            assert step.state.value == "cancelled"
            assert "running" not in Workflow.results(pg_engine, wid)
        assert record.counters.as_dict() == recount(pg_engine, wid)
        seen[done] += 1
    assert sum(seen.values()) == 30
