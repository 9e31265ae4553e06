"""Explain.workflow_step: label, blocker codes and dependency snapshot, on both backends."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, delete, update

from ledger import tables as t
from streamflow import Dep, Explain, StepNotFoundError, Workflow, WorkflowNotFoundError
from tests.workers import Noop


def sync_customer() -> Workflow:
    return (
        Workflow.new("sync_customer", workflow_context={"account_id": 42})
        .add("fetch_customer", Noop.new({"account_id": 42}))
        .add(
            "sync_billing",
            Noop.new({"customer": Workflow.result("fetch_customer")}),
            deps=["fetch_customer"],
        )
        .add("cleanup", Noop.new(), deps=[Dep("sync_billing", policy="continue")])
    )


def explain(engine: Engine, wid: str, step: str) -> tuple[str, str, list[str]]:
    r = Explain.workflow_step(wid, step, repo=engine)
    return r.label, r.state, r.blocker_codes


def test_waiting_on_dependencies(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    report = Explain.workflow_step(wid, "sync_billing", repo=engine)
    assert (report.label, report.state) == ("Waiting", "pending")
    assert report.blocker_codes == ["waiting_on_dependencies"]
    assert [d.to_dict() for d in report.dependencies] == [
        {
            "step": "fetch_customer",
            "state": "available",
            "policy": "cancel",
            "satisfied": False,
            "has_result": False,
        }
    ]
    assert "fetch_customer" in report.reason
    assert json.loads(json.dumps(report.to_dict()))["label"] == "Waiting"


def test_runnable_running_done(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    assert explain(engine, wid, "fetch_customer") == ("Runnable", "available", [])
    Workflow.complete_step(engine, wid, "fetch_customer", status="completed", payload={"id": 1})
    assert explain(engine, wid, "fetch_customer") == ("Done", "completed", [])
    assert explain(engine, wid, "sync_billing") == ("Runnable", "available", [])
    deps = Explain.workflow_step(wid, "sync_billing", repo=engine).dependencies
    assert (deps[0].satisfied, deps[0].has_result) == (True, True)
    with engine.begin() as conn:
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == "sync_billing")
            .values(state="executing", attempt=1)
        )
    assert explain(engine, wid, "sync_billing") == ("Running", "executing", [])


def test_waiting_on_a_retryable_dependency(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    Workflow.complete_step(engine, wid, "fetch_customer", status="retryable", payload={"e": 1})
    assert explain(engine, wid, "fetch_customer") == ("Waiting", "retryable", ["retry_scheduled"])
    assert explain(engine, wid, "sync_billing") == (
        "Waiting",
        "pending",
        ["waiting_on_retryable_dependency"],
    )


def test_cancelled_by_dependency_names_the_cause(engine: Engine) -> None:
    wf = (
        sync_customer()
        .add("notify", Noop.new(), deps=["sync_billing"])
        .add("audit", Noop.new(), deps=["notify"])
    )
    wid = Workflow.insert(wf, engine).id
    Workflow.complete_step(engine, wid, "fetch_customer", status="failed")
    report = Explain.workflow_step(wid, "audit", repo=engine)
    assert (report.label, report.state) == ("Cancelled", "cancelled")
    assert report.blocker_codes == ["cancelled_by_dependency"]
    assert (report.cancelled_by_step, report.cancel_root_step) == ("notify", "fetch_customer")
    assert "'fetch_customer' failed" in report.reason
    # cleanup hangs off a continue edge from the cancelled sync_billing: it runs.
    assert explain(engine, wid, "cleanup") == ("Runnable", "available", [])
    assert explain(engine, wid, "fetch_customer") == ("Needs Review", "failed", ["step_failed"])


def test_ambiguous_outcome_needs_review(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    Workflow.complete_step(engine, wid, "fetch_customer", status="completed", payload={"id": 1})
    Workflow.complete_step(engine, wid, "fetch_customer", status="completed", payload={"id": 2})
    report = Explain.workflow_step(wid, "fetch_customer", repo=engine)
    assert (report.label, report.state, report.blocker_codes) == (
        "Needs Review",
        "completed",
        ["ambiguous_outcome"],
    )
    assert report.needs_review


def test_release_not_applied_is_blocked(engine: Engine) -> None:
    # A release lost between transactions (what the reconciler repairs), made by hand.
    wid = Workflow.insert(sync_customer(), engine).id
    created = Workflow.get(engine, wid).created_at
    with engine.begin() as conn:
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == "fetch_customer")
            .values(state="completed")
        )
        conn.execute(
            t.results.insert().values(
                workflow_id=wid, step="fetch_customer", attempt=1, payload=1, recorded_at=created
            )
        )
    assert explain(engine, wid, "sync_billing") == ("Blocked", "pending", ["release_not_applied"])


def test_missing_dependency_result_is_blocked(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    Workflow.complete_step(engine, wid, "fetch_customer", status="completed", payload=1)
    with engine.begin() as conn:
        conn.execute(delete(t.results).where(t.results.c.workflow_id == wid))
    assert explain(engine, wid, "sync_billing") == (
        "Blocked",
        "available",
        ["missing_dependency_result"],
    )


def test_unknown_ids_raise(engine: Engine) -> None:
    wid = Workflow.insert(sync_customer(), engine).id
    with pytest.raises(WorkflowNotFoundError):
        Explain.workflow_step("nope", "fetch_customer", repo=engine)
    with pytest.raises(StepNotFoundError, match="its steps: 'fetch_customer'"):
        Explain.workflow_step(wid, "nope", repo=engine)
