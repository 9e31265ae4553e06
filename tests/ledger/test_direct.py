"""The hot path's statements sent straight to psycopg (`ledger.direct`) must be
indistinguishable from SQLAlchemy's path: the same rows, the same types, the same writes,
the same errors. Each test runs both ways on a real PostgreSQL and compares."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql.expression import Executable

from ledger import direct
from ledger import tables as t
from ledger.claims import _TAKE_AT_ONCE, claim_step
from ledger.db import _LOCK_WORKFLOW, _LOCK_WORKFLOWS, transaction
from ledger.jobs import complete_job
from ledger.transitions import _STEP_HISTORY_AND_CHILDREN, complete_step
from streamflow import Workflow
from streamflow.engine.retrying import is_transient
from tests.workers import Emails, Noop

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _fan(engine: Engine) -> str:
    wf = (
        Workflow.new("fan", {"tenant": "t1", "nothing": None})
        .add("root", Noop.new({"n": 1}))
        .add("mail", Emails.new(), deps=["root"])
        .add("log", Noop.new({}, priority=5), deps=["root"])
        .add("join", Noop.new(), deps=["mail", "log"])
    )
    return Workflow.insert(wf, engine).id


def _through_sqlalchemy(conn: Connection) -> None:
    """A cursor listener: `ledger.direct` then takes SQLAlchemy's own path."""
    sa_event.listen(conn, "before_cursor_execute", lambda *a: None)


def _both_ways(engine: Engine, work: Callable[[Connection], Any]) -> tuple[Any, Any]:
    """`work` run by SQLAlchemy's path and by the direct one, each in a transaction
    that is rolled back, so both start from the same ledger."""
    results = []
    for via_sqlalchemy in (True, False):
        with engine.connect() as conn, conn.begin() as tx:
            if via_sqlalchemy:
                _through_sqlalchemy(conn)
            results.append(work(conn))
            tx.rollback()
    return results[0], results[1]


def _hot_reads(wid: str) -> list[tuple[Executable, dict[str, Any]]]:
    return [
        (_STEP_HISTORY_AND_CHILDREN, {"b_wf": wid, "b_step": "root", "b_parent": "root"}),
        (_STEP_HISTORY_AND_CHILDREN, {"b_wf": wid, "b_step": "mail", "b_parent": "mail"}),
        (_LOCK_WORKFLOW, {"b_id": wid}),
        (_LOCK_WORKFLOWS, {"b_ids": [wid, "nope"]}),
        (
            _TAKE_AT_ONCE,
            {
                "b_wf": wid,
                "b_step": "mail",  # released by root, whose result it receives
                "b_now": NOW,
                "bs_lease_owner": "w1",
                "bs_lease_expires_at": NOW,
            },
        ),
    ]


def _typed(rows: list[dict[str, Any]]) -> list[dict[str, tuple[type, Any]]]:
    # Equal values of different types (an int and a float, two time zones) must not pass.
    return [{k: (type(v), v, getattr(v, "tzinfo", None)) for k, v in r.items()} for r in rows]


def _fan_past_its_root(engine: Engine) -> str:
    """`_fan`, with root completed: it has an outcome and a result, mail is available."""
    wid = _fan(engine)
    with transaction(engine) as conn:
        claim_step(conn, wid, "root", owner="w0", lease_seconds=30, now=NOW)
        complete_step(conn, wid, "root", "completed", {"sent": [1, None, "x"]}, now=NOW)
    return wid


def test_each_hot_statement_returns_the_same_rows_both_ways(pg_engine: Engine) -> None:
    wid = _fan_past_its_root(pg_engine)
    for statement, params in _hot_reads(wid):
        by_sqlalchemy, by_direct = _both_ways(
            pg_engine, lambda c, s=statement, p=params: direct.rows(c, s, p)
        )
        assert by_direct, f"{statement}: no rows to compare"
        assert _typed(by_direct) == _typed(by_sqlalchemy)


def test_the_direct_path_runs_no_sqlalchemy_execution(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    wid = _fan(pg_engine)
    with transaction(pg_engine) as conn:
        with monkeypatch.context() as patch:
            patch.setattr(Connection, "execute", lambda *a, **k: pytest.fail("executed by SA"))
            row = direct.first(conn, _LOCK_WORKFLOW, {"b_id": wid})
        assert row is not None and row["id"] == wid
        sent: list[str] = []
        sa_event.listen(conn, "before_cursor_execute", lambda *a: sent.append(a[2]))
        assert direct.first(conn, _LOCK_WORKFLOW, {"b_id": wid}) == row
        assert len(sent) == 1, "with a listener, the statement goes through SQLAlchemy"


def _snapshot(conn: Connection, wid: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for table in (t.workflows, t.steps, t.attempts, t.results):
        key = t.workflows.c.id if table is t.workflows else table.c.workflow_id
        order = [c for c in table.primary_key.columns]
        rows = conn.execute(select(table).where(key == wid).order_by(*order)).mappings()
        out[table.name] = [dict(r) for r in rows]
    return out


@pytest.mark.parametrize("payload", [{"sent": [1, None]}, None, "text", [1, 2.5]])
def test_a_claim_and_an_outcome_with_hand_off_write_the_same_both_ways(
    pg_engine: Engine, payload: Any
) -> None:
    wid = _fan(pg_engine)

    def claim_then_finish(conn: Connection) -> tuple[Any, ...]:
        claim = claim_step(conn, wid, "root", owner="w1", lease_seconds=30, now=NOW)
        result = complete_job(
            conn,
            "step",
            wid,
            "root",
            "completed",
            payload,
            attempt=1,
            source="worker",
            now=NOW,
            dispatch=True,
            hand_off_queues=("default", "emails"),
            hand_off_owner="w1",
            hand_off_lease_seconds=30,
        )
        return claim, result, _snapshot(conn, wid)

    by_sqlalchemy, by_direct = _both_ways(pg_engine, claim_then_finish)
    assert by_direct[2] == by_sqlalchemy[2]
    assert by_direct[:2] == by_sqlalchemy[:2]
    assert by_direct[1].hand_off_claim is not None, "the hand-off path was not exercised"


def test_statements_sent_together_return_what_each_returns_alone(pg_engine: Engine) -> None:
    """`direct.pipelined`: one round trip, each statement's rows as `direct.rows` gives
    them; a later statement sees what an earlier one wrote (the claim's move)."""
    wid = _fan_past_its_root(pg_engine)
    reads = _hot_reads(wid)
    then = (_STEP_HISTORY_AND_CHILDREN, {"b_wf": wid, "b_step": "mail", "b_parent": "mail"})

    def one_by_one(conn: Connection) -> list[Any]:
        return [_typed(direct.rows(conn, s, p)) for s, p in [*reads, then]]

    def together(conn: Connection) -> list[Any]:
        return [_typed(rows) for rows in direct.pipelined(conn, [*reads, then])]

    alone, _ = _both_ways(pg_engine, one_by_one)
    via_sqlalchemy, sent_together = _both_ways(pg_engine, together)
    assert sent_together == alone == via_sqlalchemy
    assert alone[-1][0]["state"][1] == "executing", "the read after the claim saw it"


def test_statements_sent_together_run_no_sqlalchemy_execution(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    wid = _fan_past_its_root(pg_engine)
    with transaction(pg_engine) as conn, monkeypatch.context() as patch:
        patch.setattr(Connection, "execute", lambda *a, **k: pytest.fail("executed by SA"))
        assert [len(rows) for rows in direct.pipelined(conn, _hot_reads(wid))] == [1, 1, 1, 1, 1]


def test_a_refused_statement_among_others_raises_sqlalchemys_error(pg_engine: Engine) -> None:
    wid = _fan(pg_engine)
    bad = {"b_wf": wid, "b_step": "root", "b_now": None}  # updated_at is NOT NULL
    bad |= {"bs_lease_owner": "w1", "bs_lease_expires_at": NOW}
    with pytest.raises(IntegrityError), transaction(pg_engine) as conn:
        direct.pipelined(conn, [(_LOCK_WORKFLOW, {"b_id": wid}), (_TAKE_AT_ONCE, bad)])
    with transaction(pg_engine) as conn:  # the connection went back to the pool usable
        assert direct.rows(conn, _LOCK_WORKFLOW, {"b_id": wid})[0]["id"] == wid


def test_a_statement_the_server_refuses_raises_sqlalchemys_error(pg_engine: Engine) -> None:
    wid = _fan(pg_engine)
    params = {
        "b_wf": wid,
        "b_step": "root",
        "b_now": None,  # updated_at is NOT NULL
        "bs_lease_owner": "w1",
        "bs_lease_expires_at": NOW,
    }
    with pytest.raises(IntegrityError), transaction(pg_engine) as conn:
        direct.rows(conn, _TAKE_AT_ONCE, params)


@pytest.mark.parametrize("together", [False, True], ids=["alone", "pipelined"])
def test_a_lost_connection_is_invalidated_and_transient(pg_engine: Engine, together: bool) -> None:
    wid = _fan(pg_engine)
    lock = (_LOCK_WORKFLOW, {"b_id": wid})
    with pg_engine.connect() as conn:
        conn.begin()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(OperationalError) as raised:
            if together:
                direct.pipelined(conn, [lock, lock])
            else:
                direct.rows(conn, *lock)
        assert raised.value.connection_invalidated
        assert is_transient(raised.value)
        assert conn.invalidated
    with pg_engine.connect() as conn:  # the pool hands out a working connection
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    with transaction(pg_engine) as conn:
        assert direct.pipelined(conn, [lock])[0][0]["id"] == wid


def test_sqlite_takes_sqlalchemys_path(sqlite_engine: Engine) -> None:
    wid = _fan(sqlite_engine)
    with transaction(sqlite_engine) as conn:
        rows = direct.rows(
            conn,
            _STEP_HISTORY_AND_CHILDREN.with_only_columns(
                *[c for c in _STEP_HISTORY_AND_CHILDREN.selected_columns if c.name != "children"]
            ),
            {"b_wf": wid, "b_step": "root"},
        )
    assert rows[0]["state"] == "available"
