"""Workflow.insert on both backends: what lands, and in whose transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, insert, select

from ledger import tables as t
from streamflow import SEMANTICS_VERSION, Dep, Workflow, WorkflowNotFoundError
from tests.ledger.helpers import states
from tests.workers import Emails, Noop


def customer_sync() -> Workflow:
    return (
        Workflow.new("sync_customer", workflow_context={"account_id": 42, "label": "Customer"})
        .add("fetch_customer", Noop.new({"account_id": 42}))
        .add(
            "sync_billing",
            Emails.new({"account_id": 42, "customer": Workflow.result("fetch_customer")}),
            deps=["fetch_customer"],
        )
        .add("cleanup", Noop.new({}), deps=[Dep("sync_billing", policy="continue")])
    )


def test_insert_writes_workflow_steps_and_edges(engine: Engine) -> None:
    persisted = Workflow.insert(customer_sync(), engine)
    assert isinstance(persisted.id, str) and persisted.id
    assert persisted.name == "sync_customer"
    assert persisted.step_names == ["fetch_customer", "sync_billing", "cleanup"]

    wf = Workflow.get(engine, persisted.id)
    assert wf.state == "running" and wf.outcome is None
    assert wf.semantics_version == SEMANTICS_VERSION == 2
    assert wf.context == {"account_id": 42, "label": "Customer"}
    assert wf.counters.as_dict() == {
        "pending": 2,
        "runnable": 1,
        "executing": 0,
        "retryable": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert states(engine, persisted.id) == {
        "fetch_customer": "available",
        "sync_billing": "pending",
        "cleanup": "pending",
    }
    billing = wf.steps["sync_billing"]
    assert billing.worker == "tests.workers:Emails"
    assert (billing.queue, billing.max_attempts, billing.priority) == ("emails", 5, 3)
    assert billing.args == {"account_id": 42, "customer": {"$streamflow.result": "fetch_customer"}}
    assert [(p, str(pol)) for p, pol in wf.steps["cleanup"].deps] == [("sync_billing", "continue")]


def test_ids_are_unique(engine: Engine) -> None:
    ids = {Workflow.insert(customer_sync(), engine).id for _ in range(20)}
    assert len(ids) == 20


def test_insert_with_a_connection_joins_the_callers_transaction(engine: Engine) -> None:
    with engine.connect() as conn, conn.begin() as tx:
        persisted = Workflow.insert(customer_sync(), conn)
        # Visible inside the caller's transaction...
        assert Workflow.get(conn, persisted.id).name == "sync_customer"
        tx.rollback()
    # ...and gone with it.
    with pytest.raises(WorkflowNotFoundError):
        Workflow.get(engine, persisted.id)


def test_insert_commits_with_the_callers_business_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        persisted = Workflow.insert(customer_sync(), conn)
        conn.execute(
            insert(t.cancel_requests).values(  # stands in for an app's own row
                workflow_id=persisted.id, reason="business row", created_at=func.now()
            )
        )
    assert Workflow.get(engine, persisted.id).name == "sync_customer"


def test_failed_insert_leaves_the_callers_transaction_usable(engine: Engine) -> None:
    bad = Workflow.new("w").add("a", Noop.new({"x": {1}}))
    with engine.begin() as conn:
        with pytest.raises(ValueError):
            Workflow.insert(bad, conn)
        persisted = Workflow.insert(customer_sync(), conn)
    assert Workflow.get(engine, persisted.id).steps
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.workflows)).scalar() == 1


def test_unknown_workflow_reads_raise(engine: Engine) -> None:
    with pytest.raises(WorkflowNotFoundError, match="no workflow with id 'nope'"):
        Workflow.get(engine, "nope")
    with pytest.raises(WorkflowNotFoundError):
        Workflow.results(engine, "nope")
