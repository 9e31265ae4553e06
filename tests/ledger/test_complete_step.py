"""The runtime semantics of complete_step, rule by rule, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger import tables as t
from ledger.operations import complete
from ledger.rules import Classification
from streamflow import (
    Dep,
    InvalidCompletionError,
    StepNotFoundError,
    Workflow,
    WorkflowNotFoundError,
)
from tests.ledger.helpers import evidence, recount, states
from tests.workers import Noop


def chain(*names: str, max_attempts: int = 3) -> Workflow:
    wf = Workflow.new("chain")
    prev: str | None = None
    for n in names:
        wf = wf.add(n, Noop.new({}, max_attempts=max_attempts), deps=[prev] if prev else [])
        prev = n
    return wf


def done(engine: Engine, wid: str, step: str, payload: Any = None) -> Any:
    return Workflow.complete_step(engine, wid, step, status="completed", payload=payload)


def table_count(engine: Engine, table: Any, wid: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(table.c.workflow_id == wid)
            ).scalar_one()
        )


# -- completed -------------------------------------------------------------------------------


def test_completed_stores_the_payload_and_releases_the_child(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b", "c"), engine).id
    result = done(engine, wid, "a", {"customer_id": 1})
    assert result.classification is Classification.APPLIED
    assert result.released == ("b",)
    assert states(engine, wid) == {"a": "completed", "b": "available", "c": "pending"}
    assert Workflow.results(engine, wid) == {"a": {"customer_id": 1}}
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)


def test_fan_in_releases_only_when_every_parent_is_done(engine: Engine) -> None:
    wf = (
        Workflow.new("fan")
        .add("root", Noop.new())
        .add("x", Noop.new(), deps=["root"])
        .add("y", Noop.new(), deps=["root"])
        .add(
            "join",
            Noop.new({"x": Workflow.result("x"), "y": Workflow.result("y")}),
            deps=["x", "y"],
        )
    )
    wid = Workflow.insert(wf, engine).id
    assert done(engine, wid, "root", 0).released == ("x", "y")
    assert done(engine, wid, "x", 1).released == ()
    assert states(engine, wid)["join"] == "pending"
    assert done(engine, wid, "y", 2).released == ("join",)
    result = done(engine, wid, "join", 3)
    assert result.workflow_outcome == "completed"
    wf_record = Workflow.get(engine, wid)
    assert (wf_record.state, wf_record.outcome) == ("finished", "completed")
    assert wf_record.finished_at is not None
    assert Workflow.results(engine, wid) == {"root": 0, "x": 1, "y": 2, "join": 3}


def test_placeholders_resolve_to_stored_payloads(engine: Engine) -> None:
    from ledger.placeholders import resolve

    wf = (
        Workflow.new("w")
        .add("a", Noop.new())
        .add("b", Noop.new({"customer": Workflow.result("a"), "n": 1}), deps=["a"])
    )
    wid = Workflow.insert(wf, engine).id
    done(engine, wid, "a", {"customer_id": 7})
    args = Workflow.get(engine, wid).steps["b"].args
    resolved, missing = resolve(args, Workflow.results(engine, wid))
    assert resolved == {"customer": {"customer_id": 7}, "n": 1}
    assert missing == []


# -- retryable --------------------------------------------------------------------------------


def test_retryable_keeps_descendants_pending_and_keeps_history(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b", max_attempts=5), engine).id
    now = datetime.now(UTC)
    r1 = complete(engine, wid, "a", "retryable", {"error": "timeout"}, now=now)
    assert (r1.classification, r1.status, r1.attempt) == (Classification.APPLIED, "retryable", 1)
    step = Workflow.get(engine, wid).steps["a"]
    assert step.state.value == "retryable" and step.attempt == 1
    assert step.scheduled_at is not None and step.scheduled_at > now
    assert states(engine, wid)["b"] == "pending"

    r2 = complete(engine, wid, "a", "retryable", {"error": "refused"})
    assert r2.attempt == 2
    r3 = done(engine, wid, "a", {"ok": True})
    assert (r3.attempt, r3.released) == (3, ("b",))
    assert table_count(engine, t.attempts, wid) == 3
    assert Workflow.results(engine, wid) == {"a": {"ok": True}}
    assert Workflow.get(engine, wid).steps["a"].scheduled_at is None


def test_retryable_on_the_last_attempt_is_recorded_as_failed(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b", max_attempts=2), engine).id
    assert complete(engine, wid, "a", "retryable", {"e": 1}).status == "retryable"
    r = complete(engine, wid, "a", "retryable", {"e": 2})
    assert (r.status, r.reason, r.cancelled) == ("failed", "attempts_exhausted", ("b",))
    step = Workflow.get(engine, wid).steps["a"]
    assert (step.state.value, step.terminal_cause) == ("failed", "attempts_exhausted")


def test_repeated_retryable_is_a_duplicate(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    complete(engine, wid, "a", "retryable", {"e": 1})
    r = complete(engine, wid, "a", "retryable", {"e": 1})
    assert r.classification is Classification.DUPLICATE
    assert table_count(engine, t.attempts, wid) == 1
    assert [e["classification"] for e in evidence(engine, wid)] == ["duplicate"]


def test_retry_time_can_be_given(engine: Engine) -> None:
    wid = Workflow.insert(chain("a"), engine).id
    at = datetime(2030, 1, 1, tzinfo=UTC)
    complete(engine, wid, "a", "retryable", None, retry_at=at)
    assert Workflow.get(engine, wid).steps["a"].scheduled_at == at


# -- failed and cancelled: the cascade ---------------------------------------------------------


def test_failure_cascades_through_cancel_edges_recursively(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b", "c", "d"), engine).id
    done(engine, wid, "a")
    r = Workflow.complete_step(engine, wid, "b", status="failed", payload={"error": "x"})
    assert r.cancelled == ("c", "d")
    assert r.workflow_outcome == "failed"
    wf = Workflow.get(engine, wid)
    assert states(engine, wid) == {
        "a": "completed",
        "b": "failed",
        "c": "cancelled",
        "d": "cancelled",
    }
    c, d = wf.steps["c"], wf.steps["d"]
    assert (c.cancelled_by_step, c.cancel_root_step, c.terminal_cause) == (
        "b",
        "b",
        "cancelled_by_dependency",
    )
    assert (d.cancelled_by_step, d.cancel_root_step) == ("c", "b")
    assert wf.counters.as_dict() == recount(engine, wid)
    assert (wf.state, wf.outcome) == ("finished", "failed")


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_continue_edge_counts_a_terminal_parent_as_satisfied(engine: Engine, status: str) -> None:
    wf = (
        Workflow.new("w")
        .add("work", Noop.new())
        .add("after", Noop.new(), deps=["work"])
        .add("cleanup", Noop.new(), deps=[Dep("work", policy="continue")])
        .add("report", Noop.new(), deps=[Dep("after", policy="continue")])
    )
    wid = Workflow.insert(wf, engine).id
    r = Workflow.complete_step(engine, wid, "work", status=status)
    # `after` is cancelled through its cancel edge; both continue edges are satisfied, so
    # cleanup (after work) and report (after the cancelled `after`) are released.
    assert r.cancelled == ("after",)
    assert set(r.released) == {"cleanup", "report"}
    assert states(engine, wid) == {
        "work": status,
        "after": "cancelled",
        "cleanup": "available",
        "report": "available",
    }


def test_continue_edge_with_missing_result_resolves_to_none(engine: Engine) -> None:
    from ledger.placeholders import resolve

    wf = (
        Workflow.new("w")
        .add("work", Noop.new())
        .add(
            "cleanup",
            Noop.new({"r": Workflow.result("work")}),
            deps=[Dep("work", policy="continue")],
        )
    )
    wid = Workflow.insert(wf, engine).id
    Workflow.complete_step(engine, wid, "work", status="failed")
    args = Workflow.get(engine, wid).steps["cleanup"].args
    assert resolve(args, Workflow.results(engine, wid)) == ({"r": None}, ["work"])


def test_one_cancel_edge_wins_over_other_satisfied_parents(engine: Engine) -> None:
    wf = (
        Workflow.new("w")
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("join", Noop.new(), deps=[Dep("a", "continue"), "b"])
    )
    wid = Workflow.insert(wf, engine).id
    Workflow.complete_step(engine, wid, "a", status="failed")
    assert states(engine, wid)["join"] == "pending"
    r = Workflow.complete_step(engine, wid, "b", status="cancelled")
    assert r.cancelled == ("join",)


def test_a_pending_step_may_be_cancelled(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b", "c"), engine).id
    r = Workflow.complete_step(engine, wid, "b", status="cancelled", payload={"why": "manual"})
    assert r.classification is Classification.APPLIED
    assert r.cancelled == ("c",)
    assert Workflow.get(engine, wid).steps["b"].terminal_cause == "cancelled"


# -- terminal states never change --------------------------------------------------------------


def test_repeated_completion_is_a_duplicate_and_changes_nothing(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    done(engine, wid, "a", {"v": 1})
    before = Workflow.get(engine, wid)
    r = done(engine, wid, "a", {"v": 1.0})
    assert r.classification is Classification.DUPLICATE
    assert r.released == ()
    after = Workflow.get(engine, wid)
    assert after.steps == before.steps and after.counters == before.counters
    assert table_count(engine, t.results, wid) == 1
    assert table_count(engine, t.attempts, wid) == 1
    assert evidence(engine, wid) == [
        {"step": "a", "classification": "duplicate", "status": "completed", "reason": None}
    ]


@pytest.mark.parametrize(
    ("first", "second", "payload2"),
    [
        ("completed", "completed", {"v": 2}),
        ("completed", "failed", {"v": 1}),
        ("failed", "completed", {"v": 1}),
        ("completed", "retryable", {"v": 1}),
    ],
)
def test_conflicting_outcome_is_ambiguous_and_the_first_stands(
    engine: Engine, first: str, second: str, payload2: Any
) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    Workflow.complete_step(engine, wid, "a", status=first, payload={"v": 1})
    before = states(engine, wid)
    r = Workflow.complete_step(engine, wid, "a", status=second, payload=payload2)
    assert r.classification is Classification.AMBIGUOUS
    assert states(engine, wid) == before
    wf = Workflow.get(engine, wid)
    assert wf.steps["a"].needs_review and wf.needs_review
    assert not wf.steps["b"].needs_review
    assert evidence(engine, wid)[-1]["classification"] == "ambiguous"
    if first == "completed":
        assert Workflow.results(engine, wid) == {"a": {"v": 1}}


@pytest.mark.parametrize("status", ["completed", "failed", "retryable"])
def test_outcome_for_a_cancelled_step_is_late(engine: Engine, status: str) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    Workflow.complete_step(engine, wid, "a", status="failed")
    # b was cancelled by the cascade; it can only have been reported by something stale.
    Workflow.complete_step(engine, wid, "a", status="failed")  # duplicate of the failure
    r = Workflow.complete_step(engine, wid, "b", status=status, payload={"v": 1})
    assert r.classification is Classification.LATE
    assert states(engine, wid)["b"] == "cancelled"
    assert [e["classification"] for e in evidence(engine, wid)] == ["duplicate", "late"]
    assert Workflow.results(engine, wid) == {}


def test_stale_attempt_from_a_revoked_worker_is_late(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    complete(engine, wid, "a", "retryable", {"e": 1})
    r = complete(engine, wid, "a", "completed", {"v": 1}, attempt=1, source="worker")
    assert (r.classification, r.reason) == (Classification.LATE, "stale_attempt")
    assert states(engine, wid)["a"] == "retryable"
    dup = complete(engine, wid, "a", "retryable", {"e": 1}, attempt=1, source="worker")
    assert dup.classification is Classification.DUPLICATE


# -- mistakes raise and write nothing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": "a", "status": "done"}, InvalidCompletionError, "unknown status 'done'"),
        (
            {"step": "a", "status": "completed", "payload": {"t": {1}}},
            InvalidCompletionError,
            r"payload\.t",
        ),
        (
            {"step": "a", "status": "completed", "payload": float("nan")},
            InvalidCompletionError,
            "NaN",
        ),
        ({"step": "ghost", "status": "completed"}, StepNotFoundError, "has no step 'ghost'"),
        ({"step": "b", "status": "completed"}, InvalidCompletionError, "is pending"),
        ({"step": "b", "status": "failed"}, InvalidCompletionError, "is pending"),
    ],
)
def test_mistakes_raise_and_write_nothing(
    engine: Engine, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    before = Workflow.get(engine, wid)
    with pytest.raises(error, match=match):
        Workflow.complete_step(engine, wid, **kwargs)
    assert Workflow.get(engine, wid) == before
    for table in (t.attempts, t.results, t.evidence):
        assert table_count(engine, table, wid) == 0


def test_unknown_workflow_raises(engine: Engine) -> None:
    with pytest.raises(WorkflowNotFoundError):
        Workflow.complete_step(engine, "missing", "a", status="completed")


def test_errors_are_value_or_lookup_errors() -> None:
    assert issubclass(InvalidCompletionError, ValueError)
    assert issubclass(StepNotFoundError, LookupError)
    assert issubclass(WorkflowNotFoundError, LookupError)


def test_complete_in_the_callers_transaction_rolls_back_with_it(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    with engine.connect() as conn, conn.begin() as tx:
        r = Workflow.complete_step(conn, wid, "a", status="completed", payload=1)
        assert r.released == ("b",)
        tx.rollback()
    assert states(engine, wid) == {"a": "available", "b": "pending"}
    assert Workflow.results(engine, wid) == {}


# -- the workflow outcome ---------------------------------------------------------------------


def test_outcome_completed_only_when_every_step_completed(engine: Engine) -> None:
    wid = Workflow.insert(chain("a", "b"), engine).id
    assert done(engine, wid, "a").workflow_outcome is None
    assert Workflow.get(engine, wid).outcome is None
    assert done(engine, wid, "b").workflow_outcome == "completed"


def test_cancelled_step_makes_the_outcome_failed(engine: Engine) -> None:
    wf = Workflow.new("w").add("a", Noop.new()).add("b", Noop.new())
    wid = Workflow.insert(wf, engine).id
    done(engine, wid, "a")
    assert Workflow.complete_step(engine, wid, "b", status="cancelled").workflow_outcome == (
        "failed"
    )


def test_timestamps_are_utc(engine: Engine) -> None:
    wid = Workflow.insert(chain("a"), engine).id
    done(engine, wid, "a")
    wf = Workflow.get(engine, wid)
    assert wf.created_at.tzinfo is not None and wf.created_at.utcoffset() == timedelta(0)
    assert wf.finished_at is not None and wf.finished_at >= wf.created_at
