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


# -- PostgreSQL: one statement -----------------------------------------------------------


def _rows(engine: Engine, workflow_id: str) -> dict[str, list[dict[str, object]]]:
    """Every row the insert wrote, without the workflow id (which differs)."""
    out: dict[str, list[dict[str, object]]] = {}
    with engine.connect() as conn:
        for table, order in ((t.workflows, "id"), (t.steps, "name"), (t.edges, "child")):
            key = table.c.id if table is t.workflows else table.c.workflow_id
            found = conn.execute(select(table).where(key == workflow_id).order_by(order))
            out[table.name] = [
                {k: v for k, v in row.items() if k not in ("id", "workflow_id")}
                for row in found.mappings()
            ]
    return out


def test_on_postgres_an_insert_is_one_statement_and_writes_what_the_general_path_does(
    pg_engine: Engine,
) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import event as sa_event

    from ledger.db import transaction
    from ledger.insert import insert_rows_one_table_at_a_time, insert_workflow

    with_callback = Workflow.new(
        "sync_customer", {"account_id": 42}, on_finish=Emails.new({"to": "ops@example.com"})
    )
    for step in customer_sync().steps:
        with_callback = with_callback.add(step.name, step.job, deps=list(step.deps))
    definition = with_callback.definition()
    now = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
    sent: list[str] = []
    with transaction(pg_engine) as conn:
        sa_event.listen(conn, "before_cursor_execute", lambda *a: sent.append(a[2]))
        at_once = insert_workflow(conn, definition, now)
    assert len(sent) == 1, "\n".join(sent)
    with transaction(pg_engine) as conn:
        general = insert_rows_one_table_at_a_time(conn, definition, now)
    assert _rows(pg_engine, at_once) == _rows(pg_engine, general)
    assert len(_rows(pg_engine, at_once)["streamflow_edges"]) == 2
    # And so does an insert whose caller publishes the roots (they are written dispatched).
    with transaction(pg_engine) as conn:
        at_once = insert_workflow(conn, definition, now, dispatch=True)
    with transaction(pg_engine) as conn:
        general = insert_rows_one_table_at_a_time(conn, definition, now, dispatch=True)
    assert _rows(pg_engine, at_once) == _rows(pg_engine, general)
    steps = _rows(pg_engine, at_once)["streamflow_steps"]
    dispatched = {r["name"]: r["dispatched_at"] for r in steps}
    assert dispatched == {"cleanup": None, "fetch_customer": now, "sync_billing": None}


def test_on_postgres_the_insert_notifies_the_dispatcher_only_with_a_root_to_run(
    pg_engine: Engine, postgres_url: str
) -> None:
    import psycopg

    from ledger.db import DISPATCH_CHANNEL

    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {DISPATCH_CHANNEL}")
        waits = Workflow.new("waits").add("a", Noop.new(), await_signal="go")
        Workflow.insert(waits, pg_engine)
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []
        Workflow.insert(customer_sync(), pg_engine)
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
        # A caller that publishes the roots itself does not wake the dispatcher.
        from ledger import operations

        operations.insert(pg_engine, customer_sync().definition(), dispatch=True)
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []
