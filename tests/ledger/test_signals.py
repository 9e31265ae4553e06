"""Signals and awaits: a step released only by its dependencies *and* its signal, every
signal kept and classified, deadlines that fail the step. Both backends; the races on
PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.db import transaction
from ledger.signals import InvalidSignalError, expire_awaits
from streamflow import Dep, Explain, Workflow, WorkflowNotFoundError, WorkflowValidationError
from streamflow.reconciler import Reconciler
from streamflow.streams import StreamKeys
from tests.ledger.helpers import recount, states
from tests.workers import Noop

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DEADLINE = timedelta(hours=4)


def approval(deadline: timedelta | None = DEADLINE) -> Workflow:
    """prepare -> approve (awaits manager_approval) -> ship; cleanup runs whatever happens."""
    return (
        Workflow.new("approval")
        .add("prepare", Noop.new())
        .add(
            "approve",
            Noop.new({"level": 2}),
            deps=["prepare"],
            await_signal="manager_approval",
            signal_deadline=deadline,
        )
        .add("ship", Noop.new(), deps=["approve"])
        .add("cleanup", Noop.new(), deps=[Dep("approve", policy="continue")])
    )


def insert(engine: Engine, wf: Workflow | None = None) -> str:
    return Workflow.insert(wf or approval(), engine).id


def prepared(engine: Engine) -> str:
    wid = insert(engine)
    Workflow.complete_step(engine, wid, "prepare", status="completed")
    return wid


def signal(engine: Engine, wid: str, payload: Any = None, **kw: Any) -> Any:
    return Workflow.signal(engine, wid, "manager_approval", payload, **kw)


def await_row(engine: Engine, wid: str, step: str = "approve") -> Any:
    a = t.awaits
    with engine.connect() as conn:
        return (
            conn.execute(select(a).where(a.c.workflow_id == wid, a.c.step == step)).mappings().one()
        )


def claim(engine: Engine, wid: str, step: str, now: datetime = T0) -> Claim:
    with transaction(engine) as conn:
        c = claim_step(conn, wid, step, owner="w1", lease_seconds=30, now=now)
    assert isinstance(c, Claim)
    return c


def expire(engine: Engine, now: datetime) -> Any:
    with transaction(engine) as conn:
        return expire_awaits(conn, now)


def classifications(engine: Engine, wid: str) -> list[tuple[str, str | None, str | None]]:
    return [(s.classification, s.step, s.reason) for s in Workflow.signals(engine, wid)]


# -- the await ---------------------------------------------------------------------------------


def test_a_step_waits_for_its_signal_after_its_dependencies(engine: Engine) -> None:
    wid = insert(engine)
    row = await_row(engine, wid)
    assert (row["state"], row["deadline_at"]) == ("pending", None)
    result = Workflow.complete_step(engine, wid, "prepare", status="completed")
    assert result.released == ()
    assert states(engine, wid)["approve"] == "pending"
    row = await_row(engine, wid)
    assert row["state"] == "waiting"
    assert row["deadline_at"] - row["activated_at"] == DEADLINE
    report = Explain.workflow_step(wid, "approve", repo=engine)
    assert (report.label, report.blocker_codes) == ("Waiting", ["awaiting_signal"])
    assert "manager_approval" in report.reason and "deadline" in report.reason
    assert report.to_dict()["await_state"] == "waiting"
    step = Workflow.get(engine, wid).steps["approve"]
    assert (step.await_signal, step.await_state, step.awaiting_signal) == (
        "manager_approval",
        "waiting",
        True,
    )


def test_before_its_dependencies_explain_names_both(engine: Engine) -> None:
    wid = insert(engine)
    report = Explain.workflow_step(wid, "approve", repo=engine)
    assert report.blocker_codes == ["waiting_on_dependencies", "awaiting_signal"]
    assert "once its dependencies are satisfied" in report.reason


def test_a_signal_for_an_active_await_is_consumed_and_releases_the_step(engine: Engine) -> None:
    wid = prepared(engine)
    result = signal(engine, wid, {"approved": True, "by": "ann"})
    assert (result.classification, result.step, result.released) == (
        "consumed",
        "approve",
        ("approve",),
    )
    assert states(engine, wid)["approve"] == "available"
    assert await_row(engine, wid)["state"] == "satisfied"
    [s] = Workflow.signals(engine, wid)
    assert s.consumed_at is not None and s.payload == {"approved": True, "by": "ann"}
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)
    c = claim(engine, wid, "approve")
    assert c.signal == {"approved": True, "by": "ann"}
    assert c.args == {"level": 2}
    Workflow.complete_step(engine, wid, "approve", status="completed")
    assert states(engine, wid)["ship"] == "available"


def test_a_signal_before_the_await_is_active_is_held_and_consumed_later(engine: Engine) -> None:
    wid = insert(engine)
    early = signal(engine, wid, {"approved": True}, dedupe_key="k1")
    assert (early.classification, early.released) == ("recorded", ())
    assert states(engine, wid)["approve"] == "pending"
    [held] = Workflow.signals(engine, wid)
    assert held.consumed_at is None
    result = Workflow.complete_step(engine, wid, "prepare", status="completed")
    # The release that satisfied the dependencies consumed the held signal at once.
    assert result.released == ("approve",)
    [held] = Workflow.signals(engine, wid)
    assert held.classification == "recorded" and held.consumed_at is not None
    assert await_row(engine, wid)["state"] == "satisfied"
    assert claim(engine, wid, "approve").signal == {"approved": True}
    # The same signal again: a duplicate; without a key: late.
    assert signal(engine, wid, {"approved": True}, dedupe_key="k1").classification == "duplicate"
    assert signal(engine, wid, {"approved": True}).classification == "late"


def test_a_root_step_awaiting_a_signal_starts_pending_with_its_await_active(
    engine: Engine,
) -> None:
    wf = Workflow.new("root").add(
        "go", Noop.new(), await_signal="start", signal_deadline=timedelta(minutes=5)
    )
    wid = insert(engine, wf)
    record = Workflow.get(engine, wid)
    assert record.steps["go"].state.value == "pending"
    assert record.counters.as_dict() == recount(engine, wid)
    assert await_row(engine, wid, "go")["state"] == "waiting"
    assert Workflow.signal(engine, wid, "start", 1).released == ("go",)
    assert Workflow.get(engine, wid).counters.runnable == 1


def test_a_repeated_key_with_the_same_payload_is_a_duplicate(engine: Engine) -> None:
    wid = prepared(engine)
    assert signal(engine, wid, {"a": 1, "b": 2}, dedupe_key="k").classification == "consumed"
    before = Workflow.get(engine, wid)
    again = signal(engine, wid, {"b": 2, "a": 1.0}, dedupe_key="k")
    assert (again.classification, again.step, again.released) == ("duplicate", "approve", ())
    assert Workflow.get(engine, wid) == before


def test_a_repeated_key_with_another_payload_is_ambiguous_and_flags_the_step(
    engine: Engine,
) -> None:
    wid = insert(engine)
    assert signal(engine, wid, {"approved": True}, dedupe_key="k").classification == "recorded"
    other = signal(engine, wid, {"approved": False}, dedupe_key="k")
    assert (other.classification, other.reason) == ("ambiguous", "conflicts_with_first_signal")
    record = Workflow.get(engine, wid)
    assert record.needs_review and record.steps["approve"].needs_review
    report = Explain.workflow_step(wid, "approve", repo=engine)
    assert report.label == "Needs Review"
    assert report.blocker_codes[0] == "ambiguous_signal"
    # The first stands.
    Workflow.complete_step(engine, wid, "prepare", status="completed")
    assert claim(engine, wid, "approve").signal == {"approved": True}


def test_a_signal_nobody_awaits_is_unmatched(engine: Engine) -> None:
    wid = prepared(engine)
    result = Workflow.signal(engine, wid, "nobody", {"x": 1})
    assert (result.classification, result.step, result.reason) == (
        "unmatched",
        None,
        "no_such_await",
    )
    assert states(engine, wid)["approve"] == "pending"


def test_late_signals(engine: Engine) -> None:
    wid = prepared(engine)
    signal(engine, wid, 1)
    assert (signal(engine, wid, 2).classification, signal(engine, wid, 2).reason) == (
        "late",
        "already_signalled",
    )
    expired = prepared(engine)
    expire(engine, datetime.now(UTC) + DEADLINE + timedelta(seconds=1))
    assert (signal(engine, expired, 1).classification, signal(engine, expired, 1).reason) == (
        "late",
        "await_expired",
    )
    cancelled = prepared(engine)
    Workflow.cancel(engine, cancelled)
    assert await_row(engine, cancelled)["state"] == "cancelled"
    assert (signal(engine, cancelled, 1).reason, states(engine, cancelled)["approve"]) == (
        "step_finished",
        "cancelled",
    )
    assert [c for c, _, _ in classifications(engine, wid)] == ["consumed", "late", "late"]


def test_a_cascade_closes_the_await_and_a_later_signal_is_late(engine: Engine) -> None:
    wid = insert(engine)
    Workflow.complete_step(engine, wid, "prepare", status="failed")
    assert states(engine, wid)["approve"] == "cancelled"
    assert await_row(engine, wid)["state"] == "cancelled"
    assert signal(engine, wid, 1).reason == "step_finished"


# -- deadlines ---------------------------------------------------------------------------------


def test_the_deadline_fails_the_step_and_the_failure_cascades(engine: Engine) -> None:
    wid = prepared(engine)
    deadline = await_row(engine, wid)["deadline_at"]
    assert expire(engine, deadline - timedelta(seconds=1)) == []
    [expired] = expire(engine, deadline)
    assert (expired.workflow_id, expired.step, expired.signal) == (
        wid,
        "approve",
        "manager_approval",
    )
    assert expired.cancelled == ("ship",)
    assert expired.released == ("cleanup",)
    record = Workflow.get(engine, wid)
    step = record.steps["approve"]
    assert (step.state.value, step.terminal_cause) == ("failed", "signal_deadline_expired")
    assert record.steps["ship"].cancel_root_step == "approve"
    assert states(engine, wid)["cleanup"] == "available"
    assert await_row(engine, wid)["state"] == "expired"
    assert record.counters.as_dict() == recount(engine, wid)
    report = Explain.workflow_step(wid, "approve", repo=engine)
    assert report.label == "Needs Review" and "deadline" in report.reason
    with engine.connect() as conn:
        [rec] = conn.execute(
            select(t.recoveries.c.repair, t.recoveries.c.step, t.recoveries.c.evidence).where(
                t.recoveries.c.workflow_id == wid
            )
        ).all()
    assert (rec.repair, rec.step) == ("await_expired", "approve")
    assert rec.evidence["cancelled"] == ["ship"]
    # Applied once: a second sweep finds nothing.
    assert expire(engine, deadline + timedelta(hours=1)) == []


def test_the_deadline_starts_only_when_the_await_is_active(engine: Engine) -> None:
    wid = insert(engine)
    assert expire(engine, datetime.now(UTC) + timedelta(days=365)) == []
    assert states(engine, wid)["approve"] == "pending"


def test_without_a_deadline_an_await_waits_for_ever(engine: Engine) -> None:
    wid = insert(engine, approval(deadline=None))
    Workflow.complete_step(engine, wid, "prepare", status="completed")
    assert await_row(engine, wid)["deadline_at"] is None
    assert expire(engine, datetime.now(UTC) + timedelta(days=365)) == []
    assert "no deadline" in Explain.workflow_step(wid, "approve", repo=engine).reason


def test_the_reconciler_applies_deadlines_with_a_recovery_row(engine: Engine) -> None:
    wf = (
        Workflow.new("quick")
        .add("a", Noop.new())
        .add(
            "b",
            Noop.new(),
            deps=["a"],
            await_signal="go",
            signal_deadline=timedelta(milliseconds=1),
        )
    )
    wid = insert(engine, wf)
    Workflow.complete_step(engine, wid, "a", status="completed")
    time.sleep(0.01)  # past the 1 ms deadline
    summary = Reconciler(engine, None, StreamKeys(prefix="sigtest")).run_pass()
    assert summary.repairs.get("await_expired") == 1
    record = Workflow.get(engine, wid)
    assert (record.outcome, record.steps["b"].terminal_cause) == (
        "failed",
        "signal_deadline_expired",
    )
    with engine.connect() as conn:
        pass_ids = (
            conn.execute(
                select(t.recoveries.c.pass_id).where(t.recoveries.c.repair == "await_expired")
            )
            .scalars()
            .all()
        )
    assert pass_ids == [summary.pass_id]


def test_a_step_cancelled_by_hand_has_its_await_closed_by_the_sweep(engine: Engine) -> None:
    wid = prepared(engine)
    Workflow.complete_step(engine, wid, "approve", status="cancelled")
    deadline = await_row(engine, wid)["deadline_at"]
    assert expire(engine, deadline) == []
    assert await_row(engine, wid)["state"] == "cancelled"
    assert states(engine, wid)["approve"] == "cancelled"


# -- bad input ---------------------------------------------------------------------------------


def test_bad_signals_raise_and_write_nothing(engine: Engine) -> None:
    wid = prepared(engine)
    with pytest.raises(WorkflowNotFoundError):
        Workflow.signal(engine, "0" * 32, "manager_approval", 1)
    with pytest.raises(InvalidSignalError, match="not plain JSON"):
        signal(engine, wid, {"when": datetime.now(UTC)})
    with pytest.raises(InvalidSignalError, match="signal name"):
        Workflow.signal(engine, wid, "", 1)
    with pytest.raises(InvalidSignalError, match="dedupe_key"):
        signal(engine, wid, 1, dedupe_key="")
    assert Workflow.signals(engine, wid) == []


def test_awaits_are_validated() -> None:
    wf = (
        Workflow.new("bad")
        .add("a", Noop.new(), await_signal="same")
        .add("b", Noop.new(), await_signal="same")
        .add("c", Noop.new(), signal_deadline=timedelta(hours=1))
        .add("d", Noop.new(), await_signal="d", signal_deadline=timedelta(0))
        .add("e", Noop.new(), await_signal=" padded ")
    )
    with pytest.raises(WorkflowValidationError) as info:
        wf.definition()
    found = sorted((e.code, e.step) for e in info.value.errors)
    assert found == [
        ("duplicate_await", "b"),
        ("invalid_await", "c"),
        ("invalid_await", "d"),
        ("invalid_await", "e"),
    ]


# -- races, on PostgreSQL -----------------------------------------------------------------------


@pytest.mark.postgres
def test_concurrent_signals_release_the_step_exactly_once(pg_engine: Engine) -> None:
    for round_ in range(15):
        wid = prepared(pg_engine)
        barrier = threading.Barrier(8, timeout=10)

        def send(i: int, wid: str = wid, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            # Half repeat one key with one payload, half come without a key.
            key = "same" if i % 2 == 0 else None
            result = signal(pg_engine, wid, {"n": 0 if key else i}, dedupe_key=key)
            return str(result.classification)

        with ThreadPoolExecutor(8) as pool:
            seen = Counter(pool.map(send, range(8)))
        assert seen["consumed"] == 1, (round_, seen)
        assert set(seen) <= {"consumed", "duplicate", "late"}
        assert seen["consumed"] + seen["duplicate"] + seen["late"] == 8
        record = Workflow.get(pg_engine, wid)
        assert record.steps["approve"].state.value == "available"
        assert record.counters.as_dict() == recount(pg_engine, wid)


@pytest.mark.postgres
def test_a_signal_racing_the_last_dependency_releases_once(pg_engine: Engine) -> None:
    kinds: Counter[str] = Counter()
    for _ in range(20):
        wid = insert(pg_engine)
        barrier = threading.Barrier(2, timeout=10)

        def finish(wid: str = wid, barrier: threading.Barrier = barrier) -> tuple[str, ...]:
            barrier.wait()
            return Workflow.complete_step(pg_engine, wid, "prepare", status="completed").released

        def send(wid: str = wid, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait()
            return signal(pg_engine, wid, {"ok": True})

        with ThreadPoolExecutor(2) as pool:
            f1, f2 = pool.submit(finish), pool.submit(send)
            released, sent = f1.result(), f2.result()
        # Either order, the step is released exactly once.
        assert (released + sent.released).count("approve") == 1
        assert sent.classification in ("recorded", "consumed")
        assert states(pg_engine, wid)["approve"] == "available"
        assert Workflow.get(pg_engine, wid).counters.as_dict() == recount(pg_engine, wid)
        kinds[sent.classification] += 1
    assert sum(kinds.values()) == 20
