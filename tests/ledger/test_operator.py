"""Operator operations on the ledger (listing, the timeline, retry, replay), on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from ledger import operations
from ledger import tables as t
from ledger.db import read, transaction
from ledger.operator import (
    OperatorError,
    evidence_timeline,
    list_workflows,
    record_replay,
    retry_step,
)
from ledger.recoveries import record_recovery
from streamflow import Dep, StepNotFoundError, Workflow, WorkflowNotFoundError
from tests.ledger.helpers import recount, states
from tests.workers import Noop

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def insert_at(engine: Engine, wf: Workflow, when: datetime) -> str:
    return operations.insert(engine, wf.definition(), when)


def report(
    engine: Engine, wid: str, step: str, status: str, payload: Any = None, when: float = 1
) -> Any:
    return operations.complete(engine, wid, step, status, payload, now=at(when))


def retry(engine: Engine, wid: str, step: str, when: float = 10, reason: str = "fixed") -> Any:
    with transaction(engine) as conn:
        return retry_step(conn, wid, step, reason=reason, now=at(when))


def counters_agree(engine: Engine, wid: str) -> None:
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)


def step_row(engine: Engine, wid: str, step: str) -> dict[str, Any]:
    s = t.steps
    with engine.connect() as conn:
        row = (
            conn.execute(select(s).where(s.c.workflow_id == wid, s.c.name == step)).mappings().one()
        )
    return dict(row)


def checkout() -> Workflow:
    """charge fails -> receipt and archive cascade-cancelled; release_hold runs anyway."""
    return (
        Workflow.new("checkout")
        .add("charge", Noop.new(max_attempts=3))
        .add("receipt", Noop.new(), deps=["charge"])
        .add("archive", Noop.new(), deps=["receipt"])
        .add("release_hold", Noop.new(), deps=[Dep("charge", policy="continue")])
    )


# -- listing ------------------------------------------------------------------------------------


def test_list_filters_by_state_outcome_name_and_age(engine: Engine) -> None:
    one = Workflow.new("sync").add("a", Noop.new())
    old = insert_at(engine, one, T0 - timedelta(hours=3))
    mid = insert_at(engine, one, T0 - timedelta(minutes=30))
    new = insert_at(engine, checkout(), T0 - timedelta(minutes=1))
    report(engine, old, "a", "completed", when=-3 * 3600 + 5)
    report(engine, new, "charge", "failed", {"e": 1}, when=-50)
    report(engine, new, "release_hold", "completed", when=-40)

    def ids(**kw: Any) -> list[str]:
        with read(engine) as conn:
            return [w.id for w in list_workflows(conn, now=T0, **kw)]

    assert ids() == [new, mid, old]
    assert ids(state="running") == [mid]
    assert ids(state="finished") == [new, old]
    assert ids(outcome="failed") == [new]
    assert ids(outcome="completed") == [old]
    assert ids(name="sync") == [mid, old]
    assert ids(name="sync", state="finished") == [old]
    assert ids(name="nothing") == []
    assert ids(older_than=timedelta(hours=1)) == [old]
    assert ids(newer_than=timedelta(hours=1)) == [new, mid]
    assert ids(older_than=timedelta(minutes=10), newer_than=timedelta(hours=1)) == [mid]
    assert ids(limit=2) == [new, mid]
    assert ids(limit=1, state="finished") == [new]


def test_list_rows_carry_counters_and_control_plane_labels(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    report(engine, wid, "charge", "failed", {"e": 1})
    waiting = insert_at(
        engine,
        Workflow.new("chain").add("a", Noop.new()).add("b", Noop.new(), deps=["a"]),
        T0 + timedelta(seconds=1),
    )
    with read(engine) as conn:
        rows = {w.id: w for w in list_workflows(conn, now=at(60))}
    failed = rows[wid]
    assert (failed.name, failed.state, failed.outcome) == ("checkout", "running", None)
    assert failed.counters == {
        "pending": 0,
        "runnable": 1,
        "executing": 0,
        "retryable": 0,
        "completed": 0,
        "failed": 1,
        "cancelled": 2,
    }
    # Most urgent first.
    assert list(failed.labels.items()) == [("Needs Review", 1), ("Runnable", 1), ("Cancelled", 2)]
    assert rows[waiting].labels == {"Waiting": 1, "Runnable": 1}
    data = failed.to_dict()
    assert data["created_at"] == T0.isoformat()
    assert data["finished_at"] is None and data["needs_review"] is False


def test_list_labels_a_release_the_ledger_did_not_apply_as_blocked(engine: Engine) -> None:
    wid = insert_at(
        engine, Workflow.new("chain").add("a", Noop.new()).add("b", Noop.new(), deps=["a"]), T0
    )
    report(engine, wid, "a", "completed")
    # Undo the release behind the ledger's back, as a lost write would leave it.
    s = t.steps
    with engine.begin() as conn:
        conn.execute(
            update(s).where(s.c.workflow_id == wid, s.c.name == "b").values(state="pending")
        )
    with read(engine) as conn:
        [row] = list_workflows(conn, now=at(60))
    assert row.labels == {"Blocked": 1, "Done": 1}


def test_list_labels_a_step_waiting_for_its_signal_as_waiting(engine: Engine) -> None:
    # Its dependencies are done but its signal has not arrived: that is Waiting (as
    # `explain` and `status` say), not a release the ledger failed to apply.
    wf = (
        Workflow.new("approval")
        .add("a", Noop.new())
        .add("approve", Noop.new(), deps=["a"], await_signal="manager_approval")
    )
    wid = insert_at(engine, wf, T0)
    report(engine, wid, "a", "completed")
    assert states(engine, wid)["approve"] == "pending"
    with read(engine) as conn:
        [row] = list_workflows(conn, now=at(60))
    assert row.labels == {"Waiting": 1, "Done": 1}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"state": "done"}, "unknown state 'done'"),
        ({"outcome": "ok"}, "unknown outcome 'ok'"),
        ({"state": "running", "outcome": "failed"}, "a running workflow has no outcome"),
        ({"limit": 0}, "limit must be"),
        ({"older_than": timedelta(0)}, "older_than must be a positive duration"),
    ],
)
def test_list_refuses_bad_filters(engine: Engine, kw: dict[str, Any], message: str) -> None:
    with read(engine) as conn, pytest.raises(OperatorError, match=message):
        list_workflows(conn, **kw)


# -- the timeline --------------------------------------------------------------------------------


def test_timeline_merges_every_record_in_time_order(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    report(engine, wid, "charge", "failed", {"e": "declined"}, when=1)
    report(engine, wid, "charge", "failed", {"e": "declined"}, when=2)  # duplicate
    report(engine, wid, "charge", "completed", {"ok": True}, when=3)  # ambiguous
    report(engine, wid, "receipt", "completed", when=4)  # late: cascade-cancelled
    with engine.begin() as conn:
        record_recovery(
            conn,
            workflow_id=wid,
            step="release_hold",
            repair="redispatch",
            reason="dispatched 30 s ago and never claimed",
            now=at(5),
            pass_id=7,
        )
        conn.execute(
            insert(t.cancel_requests).values(
                workflow_id=wid, reason="customer left", requested_by="ops", created_at=at(6)
            )
        )
    report(engine, wid, "release_hold", "completed", {"released": 1}, when=7)

    with read(engine) as conn:
        timeline = evidence_timeline(conn, wid)
    got = [(e["kind"], e["classification"], e["step"]) for e in timeline]
    assert got == [
        ("workflow", "inserted", None),
        ("attempt", "applied", "charge"),
        ("completion", "duplicate", "charge"),
        ("completion", "ambiguous", "charge"),
        ("completion", "late", "receipt"),
        ("recovery", "redispatch", "release_hold"),
        ("cancel_request", "requested", None),
        ("attempt", "applied", "release_hold"),
        ("workflow", "finished", None),
    ]
    assert [e["when"] for e in timeline] == sorted(e["when"] for e in timeline)
    by_kind = {(e["kind"], e["classification"]): e for e in timeline}
    failed = timeline[1]
    assert (failed["status"], failed["attempt"], failed["source"]) == ("failed", 1, "api")
    assert failed["detail"] == {"payload": {"e": "declined"}}
    ambiguous = by_kind[("completion", "ambiguous")]
    assert ambiguous["reason"] == "conflicts_with_recorded_outcome"
    assert ambiguous["detail"]["payload"] == {"ok": True}
    recovery = by_kind[("recovery", "redispatch")]
    assert recovery["source"] == "reconciler"
    assert recovery["detail"]["pass_id"] == 7
    cancel = by_kind[("cancel_request", "requested")]
    assert (cancel["source"], cancel["reason"]) == ("ops", "customer left")
    finished = by_kind[("workflow", "finished")]
    assert finished["status"] == "failed"
    assert set(timeline[0]) == {
        "when",
        "kind",
        "classification",
        "step",
        "attempt",
        "status",
        "source",
        "reason",
        "detail",
    }


def test_timeline_includes_signals_and_the_callback_when_the_ledger_has_them(
    engine: Engine,
) -> None:
    signals = t.metadata.tables.get("streamflow_signals")
    callbacks = t.metadata.tables.get("streamflow_callbacks")
    deliveries = t.metadata.tables.get("streamflow_callback_attempts")
    if signals is None or callbacks is None or deliveries is None:
        pytest.skip("this ledger has no signal or callback tables yet")
    wid = insert_at(engine, Workflow.new("w").add("a", Noop.new()), T0)
    report(engine, wid, "a", "completed", when=3)
    with engine.begin() as conn:
        for i, classification in enumerate(("recorded", "duplicate")):
            conn.execute(
                insert(signals).values(
                    workflow_id=wid,
                    name="approval",
                    step="a",
                    classification=classification,
                    payload={"ok": True},
                    dedupe_key="k1",
                    reason=None if i == 0 else "already_signalled",
                    source="api",
                    created_at=at(1 + i),
                )
            )
        conn.execute(
            insert(callbacks).values(
                workflow_id=wid,
                worker="tests.workers:Noop",
                queue="default",
                args={},
                max_attempts=1,
                state="completed",
                workflow_outcome="completed",
                counters={},
                created_at=at(3),
                updated_at=at(4),
            )
        )
        conn.execute(
            insert(deliveries).values(
                workflow_id=wid, attempt=1, status="completed", source="worker", recorded_at=at(4)
            )
        )
    with read(engine) as conn:
        timeline = evidence_timeline(conn, wid)
    assert [(e["kind"], e["classification"], e["step"]) for e in timeline] == [
        ("workflow", "inserted", None),
        ("signal", "recorded", "a"),
        ("signal", "duplicate", "a"),
        ("attempt", "applied", "a"),
        ("callback", "enqueued", None),
        ("workflow", "finished", None),
        ("callback", "applied", None),
    ]
    duplicate = timeline[2]
    assert (duplicate["reason"], duplicate["source"]) == ("already_signalled", "api")
    assert duplicate["detail"]["name"] == "approval"
    assert duplicate["detail"]["payload"] == {"ok": True}


def test_timeline_limit_keeps_the_latest_entries(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    for i in range(5):
        report(engine, wid, "charge", "failed", {"e": 1}, when=1 + i)
    with read(engine) as conn:
        full = evidence_timeline(conn, wid)
        last = evidence_timeline(conn, wid, limit=3)
    assert last == full[-3:]
    assert len(full) == 1 + 1 + 4  # inserted, the failure, four duplicates


def test_timeline_of_an_unknown_workflow_raises(engine: Engine) -> None:
    with read(engine) as conn, pytest.raises(WorkflowNotFoundError):
        evidence_timeline(conn, "nope")


# -- retry ------------------------------------------------------------------------------------


def test_retry_sends_a_failed_step_round_again_and_undoes_its_cascade(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    report(engine, wid, "charge", "failed", {"e": "declined"}, when=1)
    report(engine, wid, "release_hold", "completed", when=2)
    before = Workflow.get(engine, wid)
    assert (before.state, before.outcome) == ("finished", "failed")

    result = retry(engine, wid, "charge", when=10, reason="card fixed")

    assert result.restored == ("receipt", "archive")
    assert result.recancelled == ()
    assert result.reopened is True
    assert (result.failed_attempt, result.next_attempt) == (1, 2)
    # Failed outright with attempts left: the budget is unchanged.
    assert (result.max_attempts_before, result.max_attempts) == (3, 3)
    assert states(engine, wid) == {
        "charge": "available",
        "receipt": "pending",
        "archive": "pending",
        # A continue-edge child that already ran keeps its outcome.
        "release_hold": "completed",
    }
    charge = step_row(engine, wid, "charge")
    assert charge["dispatched_at"] is None  # the dispatcher sends it
    assert charge["available_at"] == at(10)
    assert (charge["terminal_cause"], charge["finished_at"], charge["attempt"]) == (None, None, 1)
    for name in ("receipt", "archive"):
        row = step_row(engine, wid, name)
        assert (row["terminal_cause"], row["cancelled_by_step"], row["cancel_root_step"]) == (
            None,
            None,
            None,
        )
        assert row["finished_at"] is None
    after = Workflow.get(engine, wid)
    assert (after.state, after.outcome, after.finished_at) == ("running", None, None)
    counters_agree(engine, wid)

    with read(engine) as conn:
        [entry] = [e for e in evidence_timeline(conn, wid) if e["kind"] == "operator"]
    assert (entry["classification"], entry["step"], entry["attempt"], entry["source"]) == (
        "retried",
        "charge",
        1,
        "operator",
    )
    assert entry["detail"]["payload"] == {
        "reason": "card fixed",
        "max_attempts": {"before": 3, "after": 3},
        "restored": ["receipt", "archive"],
        "recancelled": [],
        "workflow_reopened": True,
        "previous_outcome": "failed",
    }

    # The workflow now runs to a completed outcome; the failed attempt stays in history.
    assert report(engine, wid, "charge", "completed", {"ok": 1}, when=11).attempt == 2
    assert states(engine, wid)["receipt"] == "available"
    report(engine, wid, "receipt", "completed", when=12)
    report(engine, wid, "archive", "completed", when=13)
    final = Workflow.get(engine, wid)
    assert (final.state, final.outcome) == ("finished", "completed")
    counters_agree(engine, wid)
    with engine.connect() as conn:
        history = conn.execute(
            select(t.attempts.c.attempt, t.attempts.c.status)
            .where(t.attempts.c.workflow_id == wid, t.attempts.c.step == "charge")
            .order_by(t.attempts.c.attempt)
        ).all()
    assert [tuple(r) for r in history] == [(1, "failed"), (2, "completed")]


def test_retry_of_an_exhausted_step_grants_one_more_attempt(engine: Engine) -> None:
    wf = Workflow.new("one").add("a", Noop.new(max_attempts=2)).add("b", Noop.new(), deps=["a"])
    wid = insert_at(engine, wf, T0)
    report(engine, wid, "a", "retryable", {"e": 1}, when=1)
    result = report(engine, wid, "a", "retryable", {"e": 2}, when=2)
    assert (result.status, result.reason) == ("failed", "attempts_exhausted")

    retried = retry(engine, wid, "a")
    assert (retried.failed_attempt, retried.max_attempts_before, retried.max_attempts) == (2, 2, 3)
    assert step_row(engine, wid, "a")["max_attempts"] == 3
    assert states(engine, wid) == {"a": "available", "b": "pending"}
    counters_agree(engine, wid)
    # That one attempt is the last: a retryable report on it fails the step again.
    again = report(engine, wid, "a", "retryable", {"e": 3}, when=20)
    assert (again.attempt, again.status, again.reason) == (3, "failed", "attempts_exhausted")
    assert states(engine, wid) == {"a": "failed", "b": "cancelled"}
    counters_agree(engine, wid)


def test_retry_recancels_a_step_another_failure_still_cancels(engine: Engine) -> None:
    wf = (
        Workflow.new("join")
        .add("x", Noop.new())
        .add("y", Noop.new())
        .add("j", Noop.new(), deps=["x", "y"])
        .add("after", Noop.new(), deps=["j"])
    )
    wid = insert_at(engine, wf, T0)
    report(engine, wid, "x", "failed", when=1)
    report(engine, wid, "y", "failed", when=2)
    assert step_row(engine, wid, "j")["cancel_root_step"] == "x"

    result = retry(engine, wid, "x")
    assert result.restored == ("j", "after")
    assert result.recancelled == ("j", "after")
    for name in ("j", "after"):
        row = step_row(engine, wid, name)
        assert (row["state"], row["cancel_root_step"]) == ("cancelled", "y")
    assert step_row(engine, wid, "j")["cancelled_by_step"] == "y"
    assert step_row(engine, wid, "after")["cancelled_by_step"] == "j"
    assert Workflow.get(engine, wid).state == "running"  # x is available again
    counters_agree(engine, wid)

    # Retrying y as well now brings the join back to pending: it waits for both.
    assert retry(engine, wid, "y", when=11).restored == ("j", "after")
    assert states(engine, wid) == {
        "x": "available",
        "y": "available",
        "j": "pending",
        "after": "pending",
    }
    counters_agree(engine, wid)


@pytest.mark.parametrize(
    ("step", "setup", "message"),
    [
        ("charge", [], "'charge' is available, not failed: it has not finished"),
        ("receipt", [], "'receipt' is pending, not failed"),
        ("charge", [("charge", "completed")], "'charge' is completed, not failed"),
        ("receipt", [("charge", "failed")], "retry 'charge' instead"),
        ("charge", [("charge", "cancelled")], "'charge' is cancelled, not failed"),
    ],
)
def test_retry_refuses_a_step_that_is_not_failed(
    engine: Engine, step: str, setup: list[tuple[str, str]], message: str
) -> None:
    wid = insert_at(engine, checkout(), T0)
    for name, status in setup:
        report(engine, wid, name, status)
    before = states(engine, wid)
    with pytest.raises(OperatorError, match=message):
        retry(engine, wid, step)
    assert states(engine, wid) == before
    with read(engine) as conn:
        assert not [e for e in evidence_timeline(conn, wid) if e["kind"] == "operator"]


def test_retry_refuses_unknown_ids_and_cancelled_workflows(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    with pytest.raises(WorkflowNotFoundError):
        retry(engine, "nope", "charge")
    with pytest.raises(StepNotFoundError, match="'charge'"):
        retry(engine, wid, "nope")
    report(engine, wid, "charge", "failed")
    with engine.begin() as conn:
        conn.execute(insert(t.cancel_requests).values(workflow_id=wid, created_at=at(3)))
    with pytest.raises(OperatorError, match="has a cancel request"):
        retry(engine, wid, "charge")
    assert states(engine, wid)["charge"] == "failed"


# -- replay -------------------------------------------------------------------------------------


def test_record_replay_names_the_recorded_event(engine: Engine) -> None:
    wf = Workflow.new("r").add("a", Noop.new(max_attempts=3))
    wid = insert_at(engine, wf, T0)
    report(engine, wid, "a", "retryable", {"e": 1}, when=1)
    report(engine, wid, "a", "completed", {"ok": 1}, when=2)
    before = (states(engine, wid), Workflow.get(engine, wid).counters)

    with transaction(engine) as conn:
        latest = record_replay(conn, wid, "a", now=at(5), reason="drill")
    assert (latest.attempt, latest.status) == (2, "completed")
    assert latest.idempotency_key == f"{wid}:a:2:completed"
    assert latest.recorded_at == at(2)
    with transaction(engine) as conn:
        first = record_replay(conn, wid, "a", attempt=1, now=at(6), source="cli")
    assert first.idempotency_key == f"{wid}:a:1:retryable"
    assert (states(engine, wid), Workflow.get(engine, wid).counters) == before

    with read(engine) as conn:
        rows = [e for e in evidence_timeline(conn, wid) if e["kind"] == "operator"]
    assert [(e["classification"], e["attempt"], e["status"], e["source"]) for e in rows] == [
        ("replayed", 2, "completed", "operator"),
        ("replayed", 1, "retryable", "cli"),
    ]
    assert rows[0]["detail"]["dedupe_key"] == latest.idempotency_key
    assert rows[0]["detail"]["payload"] == {"reason": "drill"}


def test_record_replay_refuses_what_was_never_recorded(engine: Engine) -> None:
    wid = insert_at(engine, checkout(), T0)
    with transaction(engine) as conn, pytest.raises(OperatorError, match="no recorded outcome"):
        record_replay(conn, wid, "charge", now=at(1))
    report(engine, wid, "charge", "failed")
    with transaction(engine) as conn, pytest.raises(OperatorError, match="attempt 4"):
        record_replay(conn, wid, "charge", attempt=4, now=at(1))
    with transaction(engine) as conn, pytest.raises(StepNotFoundError):
        record_replay(conn, wid, "nope", now=at(1))
    with transaction(engine) as conn, pytest.raises(WorkflowNotFoundError):
        record_replay(conn, "nope", "charge", now=at(1))
    with read(engine) as conn:
        assert not [e for e in evidence_timeline(conn, wid) if e["kind"] == "operator"]
