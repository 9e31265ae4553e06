"""`on_finish` callbacks: enqueued exactly once with the workflow's outcome, run by the
same claim and outcome rules as steps, every delivery kept. Both backends; the races on
PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger import tables as t
from ledger.callback_jobs import dispatch_callbacks, expire_callback_leases
from ledger.claims import Claim, ClaimRefused
from ledger.db import transaction
from ledger.jobs import claim_job, complete_job, release_job_claim
from ledger.model import CALLBACK_JOB, CALLBACK_STEP, ReadyStep
from ledger.operator import retry_step
from ledger.rules import ClaimVerdict, Classification
from ledger.sweeps import dispatch_undispatched, redispatch_stale
from streamflow import Workflow, WorkflowValidationError
from tests.ledger.helpers import evidence
from tests.workers import Emails, Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def notified(max_attempts: int = 3, steps: int = 2) -> Workflow:
    wf = Workflow.new(
        "notified",
        {"tenant": 7},
        on_finish=Emails.new({"to": "ops@example.com"}, max_attempts=max_attempts),
    )
    for i in range(steps):
        wf = wf.add(f"s{i}", Noop.new())
    return wf


def finish(engine: Engine, wid: str, steps: int = 2, status: str = "completed") -> None:
    for i in range(steps):
        Workflow.complete_step(engine, wid, f"s{i}", status=status, payload={"i": i})


def callback_rows(engine: Engine, wid: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(t.callbacks)
                .where(t.callbacks.c.workflow_id == wid)
            ).scalar_one()
        )


def claim(engine: Engine, wid: str, owner: str = "w1", now: datetime = NOW) -> Claim | ClaimRefused:
    with transaction(engine) as conn:
        return claim_job(
            conn, CALLBACK_JOB, wid, CALLBACK_STEP, owner=owner, lease_seconds=30, now=now
        )


def report(
    engine: Engine, wid: str, status: str, payload: Any, attempt: int, now: datetime = NOW
) -> Any:
    with transaction(engine) as conn:
        return complete_job(
            conn,
            CALLBACK_JOB,
            wid,
            CALLBACK_STEP,
            status,
            payload,
            attempt=attempt,
            source="worker",
            now=now,
            dispatch=True,
        )


def dispatch(engine: Engine, now: datetime = NOW) -> tuple[ReadyStep, ...]:
    with transaction(engine) as conn:
        return dispatch_undispatched(conn, now)


# -- enqueue ----------------------------------------------------------------------------------


def test_the_callback_is_enqueued_when_the_workflow_finishes(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    Workflow.complete_step(engine, wid, "s0", status="completed")
    assert Workflow.callback(engine, wid) is None
    Workflow.complete_step(engine, wid, "s1", status="completed", payload={"i": 1})
    cb = Workflow.callback(engine, wid)
    assert cb is not None
    assert (cb.state, cb.attempt, cb.max_attempts) == ("available", 0, 3)
    assert (cb.worker, cb.queue, cb.args) == (
        Emails.import_path(),
        "emails",
        {"to": "ops@example.com"},
    )
    assert cb.workflow_outcome == "completed"
    assert cb.counters == {
        "pending": 0,
        "runnable": 0,
        "executing": 0,
        "retryable": 0,
        "completed": 2,
        "failed": 0,
        "cancelled": 0,
    }
    assert cb.created_at == Workflow.get(engine, wid).finished_at
    assert callback_rows(engine, wid) == 1


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_failed_or_cancelled_outcome_is_reported_too(engine: Engine, status: str) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid, status=status)
    cb = Workflow.callback(engine, wid)
    assert cb is not None and cb.workflow_outcome == "failed"
    assert cb.counters[status] == 2


def test_a_cancel_request_enqueues_it_with_the_cancelled_outcome(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    Workflow.complete_step(engine, wid, "s0", status="completed")
    Workflow.cancel(engine, wid, reason="stop")
    cb = Workflow.callback(engine, wid)
    assert cb is not None
    assert (cb.workflow_outcome, cb.counters["completed"], cb.counters["cancelled"]) == (
        "cancelled",
        1,
        1,
    )
    # A repeated request enqueues nothing more.
    Workflow.cancel(engine, wid)
    assert callback_rows(engine, wid) == 1


def test_no_callback_without_on_finish(engine: Engine) -> None:
    wid = Workflow.insert(Workflow.new("plain").add("a", Noop.new()), engine).id
    Workflow.complete_step(engine, wid, "a", status="completed")
    assert Workflow.callback(engine, wid) is None
    assert dispatch(engine) == ()


def test_the_enqueue_rolls_back_with_the_outcome(engine: Engine) -> None:
    wid = Workflow.insert(notified(steps=1), engine).id
    with engine.connect() as conn:
        conn.begin()
        assert Workflow.complete_step(conn, wid, "s0", status="completed").workflow_outcome
        conn.rollback()
    assert callback_rows(engine, wid) == 0
    assert Workflow.get(engine, wid).state == "running"


def test_a_reopened_workflow_does_not_enqueue_its_callback_twice(engine: Engine) -> None:
    wid = Workflow.insert(notified(steps=1), engine).id
    Workflow.complete_step(engine, wid, "s0", status="failed", payload={"e": 1})
    with transaction(engine) as conn:
        retry_step(conn, wid, "s0", reason="fixed the bug", now=NOW)
    Workflow.complete_step(engine, wid, "s0", status="completed", payload={"ok": 1})
    assert Workflow.get(engine, wid).outcome == "completed"
    cb = Workflow.callback(engine, wid)
    assert cb is not None and cb.workflow_outcome == "failed"
    assert callback_rows(engine, wid) == 1
    [row] = [e for e in evidence(engine, wid) if e["step"] == CALLBACK_STEP]
    assert (row["classification"], row["reason"], row["status"]) == (
        "duplicate",
        "already_enqueued",
        "completed",
    )


# -- dispatch and claims ------------------------------------------------------------------------


def test_the_dispatcher_sends_it_once_as_a_callback_job(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    first = dispatch(engine)  # the two roots
    assert {r.job for r in first} == {"step"}
    finish(engine, wid)
    sent = dispatch(engine)
    assert sent == (ReadyStep(wid, CALLBACK_STEP, "emails", 3, CALLBACK_JOB),)
    assert dispatch(engine) == ()


def test_a_claim_carries_the_outcome_counters_and_results(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid)
    c = claim(engine, wid)
    assert isinstance(c, Claim)
    assert (c.job, c.step, c.attempt, c.queue) == (CALLBACK_JOB, CALLBACK_STEP, 1, "emails")
    assert c.args == {"to": "ops@example.com"}
    assert c.workflow_outcome == "completed" and c.counters is not None
    assert c.counters["completed"] == 2
    assert c.dependency_results == {"s0": {"i": 0}, "s1": {"i": 1}}
    assert c.workflow_context == {"tenant": 7}
    cb = Workflow.callback(engine, wid)
    assert cb is not None and (cb.state, cb.attempt) == ("executing", 1)


def test_a_second_delivery_runs_nothing_and_is_kept(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid)
    assert isinstance(claim(engine, wid, "w1"), Claim)
    again = claim(engine, wid, "w2")
    assert isinstance(again, ClaimRefused) and again.verdict is ClaimVerdict.DUPLICATE
    result = report(engine, wid, "completed", {"sent": 1}, attempt=1)
    assert result.applied and result.job == CALLBACK_JOB
    late = claim(engine, wid, "w3")
    assert isinstance(late, ClaimRefused) and late.verdict is ClaimVerdict.LATE
    rows = [(e["step"], e["classification"], e["reason"]) for e in evidence(engine, wid)]
    assert rows == [
        (CALLBACK_STEP, "duplicate", "callback_executing"),
        (CALLBACK_STEP, "late", "callback_completed"),
    ]


def test_each_delivery_and_its_result_are_kept(engine: Engine) -> None:
    wid = Workflow.insert(notified(max_attempts=3), engine).id
    finish(engine, wid)
    c1 = claim(engine, wid)
    assert isinstance(c1, Claim)
    r1 = report(engine, wid, "retryable", {"error": "smtp down"}, attempt=1)
    assert (r1.classification, r1.status) == (Classification.APPLIED, "retryable")
    cb = Workflow.callback(engine, wid)
    assert cb is not None and cb.state == "retryable"
    # Not due yet: nothing to send. Once due, the dispatcher promotes and sends it.
    assert dispatch(engine, NOW) == ()
    later = NOW + timedelta(minutes=10)
    # A pass that was told not to promote (one a commit's NOTIFY woke) leaves it waiting.
    with transaction(engine) as conn:
        assert dispatch_undispatched(conn, later, promote=False) == ()
    assert [r.job for r in dispatch(engine, later)] == [CALLBACK_JOB]
    c2 = claim(engine, wid, now=later)
    assert isinstance(c2, Claim) and c2.attempt == 2
    r2 = report(engine, wid, "completed", {"sent": True}, attempt=2, now=later)
    assert r2.applied
    cb = Workflow.callback(engine, wid)
    assert cb is not None
    assert (cb.state, cb.attempt, cb.result, cb.terminal_cause) == (
        "completed",
        2,
        {"sent": True},
        "completed",
    )
    assert [(a.attempt, a.status, a.payload, a.lease_owner) for a in cb.attempts] == [
        (1, "retryable", {"error": "smtp down"}, "w1"),
        (2, "completed", {"sent": True}, "w1"),
    ]
    # The same report again is a duplicate; a different one conflicts and changes nothing.
    assert report(engine, wid, "completed", {"sent": True}, attempt=2).classification is (
        Classification.DUPLICATE
    )
    assert report(engine, wid, "completed", {"sent": 0}, attempt=2).classification is (
        Classification.AMBIGUOUS
    )
    final = Workflow.callback(engine, wid)
    assert final is not None and final.result == {"sent": True}


def test_the_last_attempt_failing_fails_the_callback(engine: Engine) -> None:
    wid = Workflow.insert(notified(max_attempts=1), engine).id
    finish(engine, wid)
    assert isinstance(claim(engine, wid), Claim)
    r = report(engine, wid, "retryable", {"error": "x"}, attempt=1)
    assert (r.status, r.reason) == ("failed", "attempts_exhausted")
    cb = Workflow.callback(engine, wid)
    assert cb is not None and (cb.state, cb.terminal_cause) == ("failed", "attempts_exhausted")
    # The workflow's own outcome is not touched by its callback.
    assert Workflow.get(engine, wid).outcome == "completed"


def test_an_expired_lease_is_rescued_and_the_old_report_is_late(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid)
    assert isinstance(claim(engine, wid, "doomed"), Claim)
    with transaction(engine) as conn:
        assert expire_callback_leases(conn, NOW + timedelta(seconds=10)) == []
    with transaction(engine) as conn:
        [rescued] = expire_callback_leases(conn, NOW + timedelta(seconds=60), pass_id=None)
    assert (rescued.status, rescued.job) == ("retryable", "callback")
    cb = Workflow.callback(engine, wid)
    assert cb is not None
    assert [(a.status, a.reason, a.source) for a in cb.attempts] == [
        ("retryable", "lease_expired", "reconciler")
    ]
    later = NOW + timedelta(seconds=61)
    [ready] = dispatch(engine, later)
    assert ready.job == CALLBACK_JOB
    c2 = claim(engine, wid, "rescuer", now=later)
    assert isinstance(c2, Claim) and c2.attempt == 2
    late = report(engine, wid, "completed", {"from": "doomed"}, attempt=1, now=later)
    assert (late.classification, late.reason) == (Classification.LATE, "stale_attempt")
    with engine.connect() as conn:
        repairs = conn.execute(
            select(t.recoveries.c.repair, t.recoveries.c.step).where(
                t.recoveries.c.workflow_id == wid
            )
        ).all()
    assert [tuple(r) for r in repairs] == [("callback_lease_expired", CALLBACK_STEP)]


def test_a_draining_worker_hands_it_back(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid)
    dispatch(engine)
    c = claim(engine, wid)
    assert isinstance(c, Claim)
    with transaction(engine) as conn:
        assert release_job_claim(
            conn, CALLBACK_JOB, wid, CALLBACK_STEP, owner="w1", attempt=1, now=NOW
        )
    [again] = dispatch(engine)
    assert again.job == CALLBACK_JOB
    c2 = claim(engine, wid, "w2")
    assert isinstance(c2, Claim) and c2.attempt == 2


def test_a_lost_ready_message_is_sent_again_with_a_recovery_row(engine: Engine) -> None:
    wid = Workflow.insert(notified(), engine).id
    finish(engine, wid)
    dispatch(engine)
    with transaction(engine) as conn:
        assert redispatch_stale(conn, NOW + timedelta(seconds=5), timedelta(seconds=30)) == ()
    with transaction(engine) as conn:
        [again] = redispatch_stale(conn, NOW + timedelta(seconds=60), timedelta(seconds=30))
    assert (again.workflow_id, again.job) == (wid, CALLBACK_JOB)


def test_on_finish_is_validated() -> None:
    with pytest.raises(TypeError, match=r"on_finish must come from MyWorker\.new"):
        Workflow.new("bad", on_finish="tests.workers:Noop")  # type: ignore[arg-type]
    wf = Workflow.new(
        "bad", on_finish=Noop.new({"r": Workflow.result("a"), "when": datetime.now(UTC)})
    ).add("a", Noop.new())
    with pytest.raises(WorkflowValidationError) as info:
        wf.definition()
    codes = sorted(i.code for i in info.value.errors)
    assert codes == ["invalid_job", "not_json_safe"]
    assert all(i.step is None for i in info.value.errors)


# -- exactly once, under concurrency on PostgreSQL --------------------------------------------


@pytest.mark.postgres
def test_parallel_final_outcomes_enqueue_the_callback_exactly_once(pg_engine: Engine) -> None:
    steps = 4
    for _ in range(25):
        wid = Workflow.insert(notified(steps=steps), pg_engine).id
        barrier = threading.Barrier(steps + 1, timeout=10)

        def done(i: int, wid: str = wid, barrier: threading.Barrier = barrier) -> str | None:
            barrier.wait()
            r = Workflow.complete_step(pg_engine, wid, f"s{i}", status="completed", payload=i)
            return r.workflow_outcome

        def cancel(wid: str = wid, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return Workflow.cancel(pg_engine, wid).effect

        with ThreadPoolExecutor(steps + 1) as pool:
            futures = [pool.submit(done, i) for i in range(steps)]
            cancelled = pool.submit(cancel)
            outcomes = [f.result() for f in futures]
            effect = cancelled.result()
        record = Workflow.get(pg_engine, wid)
        finishers = [o for o in outcomes if o is not None] + (
            ["cancelled"] if effect == "applied" else []
        )
        # Exactly one transaction recorded the outcome, and it enqueued the callback.
        assert finishers == [record.outcome]
        assert callback_rows(pg_engine, wid) == 1
        cb = Workflow.callback(pg_engine, wid)
        assert cb is not None and cb.workflow_outcome == record.outcome


@pytest.mark.postgres
def test_parallel_deliveries_run_the_callback_once(pg_engine: Engine) -> None:
    for _ in range(20):
        wid = Workflow.insert(notified(), pg_engine).id
        finish(pg_engine, wid)
        barrier = threading.Barrier(6, timeout=10)

        def take(i: int, wid: str = wid, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return isinstance(claim(pg_engine, wid, f"w{i}"), Claim)

        with ThreadPoolExecutor(6) as pool:
            claimed = list(pool.map(take, range(6)))
        assert claimed.count(True) == 1
        with pg_engine.connect() as conn:
            dispatched = conn.execute(
                select(t.callbacks.c.state, t.callbacks.c.attempt).where(
                    t.callbacks.c.workflow_id == wid
                )
            ).one()
        assert tuple(dispatched) == ("executing", 1)
        assert [e["classification"] for e in evidence(pg_engine, wid)] == ["duplicate"] * 5


@pytest.mark.postgres
def test_parallel_dispatchers_send_it_once(pg_engine: Engine) -> None:
    wids = []
    for _ in range(10):
        wid = Workflow.insert(notified(steps=1), pg_engine).id
        Workflow.complete_step(pg_engine, wid, "s0", status="completed")
        wids.append(wid)
    barrier = threading.Barrier(4, timeout=10)

    def sweep(_: int) -> list[str]:
        barrier.wait()
        with transaction(pg_engine) as conn:
            return [r.workflow_id for r in dispatch_callbacks(conn, NOW) if r.job == CALLBACK_JOB]

    with ThreadPoolExecutor(4) as pool:
        sent = [w for batch in pool.map(sweep, range(4)) for w in batch]
    assert sorted(sent) == sorted(wids)
