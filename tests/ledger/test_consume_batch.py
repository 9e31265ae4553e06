"""Consuming a batch of completion events costs a few statements, whatever its size, and
gives exactly what consuming the same events one at a time gives — on both backends."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from ledger import tables as t
from ledger.consume import CompletionEventView, Consumed, consume_completions
from ledger.db import lock_event, make_engine, transaction
from ledger.evidence import record_evidence
from ledger.migrate import partition_ledger, upgrade
from ledger.operations import complete
from ledger.transitions import complete_step
from streamflow import Workflow
from tests.ledger.helpers import recount
from tests.workers import Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def event(wid: str, step: str, status: str = "completed", attempt: int = 1) -> CompletionEventView:
    return CompletionEventView(wid, step, status, attempt, f"{wid}:{step}:{attempt}:{status}")


def numbered_ids() -> Callable[[], str]:
    """Workflow ids from a counter, so two ledgers built alike hold the same ids."""
    counter = itertools.count()
    return lambda: f"wf{next(counter):030d}"


# -- a second ledger on the same backend --------------------------------------------------


@pytest.fixture(scope="module")
def pg_twin_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A second migrated PostgreSQL database beside the session's own."""
    base = make_url(request.getfixturevalue("postgres_url"))
    name = f"{base.database}_twin"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    partitions = os.environ.get("STREAMFLOW_TEST_PARTITIONS")
    if partitions:  # as the session's database is (tests/conftest.py)
        partition_ledger(engine, int(partitions))
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def twin(engine: Engine, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty ledger on the same backend as `engine`."""
    if engine.dialect.name == "sqlite":
        path = tmp_path / "twin.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        other = make_engine(f"sqlite:///{path}")
    else:
        other = make_engine(request.getfixturevalue("pg_twin_url"))
        names = ", ".join(tbl.name for tbl in reversed(t.metadata.sorted_tables))
        with other.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    yield other
    other.dispose()


# -- the scenario -------------------------------------------------------------------------


def fan(name: str = "fan") -> Workflow:
    return (
        Workflow.new(name)
        .add("root", Noop.new())
        .add("mail", Noop.new(), deps=["root"])
        .add("log", Noop.new({}, priority=5), deps=["root"])
    )


def lose_the_release(engine: Engine, wid: str, step: str) -> None:
    """A completion whose release was lost (no attempt row either), made by hand."""
    with engine.begin() as conn:
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == step)
            .values(state="completed", attempt=1)
        )
        conn.execute(
            update(t.workflows)
            .where(t.workflows.c.id == wid)
            .values(available_count=0, completed_count=1)
        )


def scenario(engine: Engine) -> list[CompletionEventView]:
    """Workflows in every situation a completion event can meet, and a batch of events
    naming them in an order that is not the workflow-id order."""
    ids = [Workflow.insert(fan(f"w{i}"), engine).id for i in range(7)]
    fast, across, dropped, retried, repair, busy, already = ids
    # The API path: released, nothing dispatched — the consumer dispatches mail and log.
    complete(engine, fast, "root", "completed", 1, now=NOW)
    # Consumed by an earlier batch: a duplicate across batches.
    complete(engine, across, "root", "completed", 1, now=NOW)
    with transaction(engine) as conn:
        consume_completions(conn, [event(across, "root")], NOW, "consumer")
    # The reconciler gave up waiting for the event and repaired without it.
    complete(engine, dropped, "root", "completed", 1, now=NOW)
    with transaction(engine) as conn:
        record_evidence(
            conn,
            workflow_id=dropped,
            step="root",
            kind="event",
            classification="dropped",
            source="reconciler",
            now=NOW,
            status="completed",
            attempt=1,
            dedupe_key=event(dropped, "root").idempotency_key,
            reason="not_consumed_in_time",
        )
    # A retry came after attempt 1: its event is late, attempt 2's is consumed.
    complete(engine, retried, "root", "retryable", {"e": 1}, now=NOW, retry_at=NOW)
    complete(engine, retried, "root", "completed", 2, now=NOW)
    # Terminal without its attempt row: the slow path applies the release.
    lose_the_release(engine, repair, "root")
    # Not terminal: consumed, nothing more.
    complete(engine, busy, "root", "retryable", {"e": 1}, now=NOW, retry_at=NOW)
    # The engine's path: the children were dispatched with the outcome.
    with transaction(engine) as conn:
        complete_step(conn, already, "root", "completed", 1, dispatch=True, now=NOW)
    # A fan-in child of two finished roots: the first event taken dispatches it.
    join = (
        Workflow.new("join")
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("c", Noop.new(), deps=["a", "b"])
    )
    both = Workflow.insert(join, engine).id
    complete(engine, both, "a", "completed", 1, now=NOW)
    complete(engine, both, "b", "completed", 1, now=NOW)
    long_id, long_step = "x" * 40, "s" * 250
    return [
        event(repair, "root"),
        event(fast, "root"),
        event("nope", "root"),
        event(both, "b"),
        event(retried, "root", "retryable", 1),
        event(across, "root"),
        event(fast, "ghost"),
        event(dropped, "root"),
        event(busy, "root", "retryable", 1),
        event(fast, "root"),  # the same delivery again, in the same batch
        event(both, "a"),
        CompletionEventView(long_id, long_step, "completed", 1, "k" * 400),
        event(already, "root"),
        event(retried, "root", "completed", 2),
        CompletionEventView(fast, long_step, "completed", 1, "q" * 400),
    ]


def outcome(c: Consumed) -> tuple[Any, ...]:
    return (c.event, c.classification, c.ready, c.repaired)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Everything consuming may write, in a form two ledgers can be compared by."""
    e, s, w, r = t.evidence, t.steps, t.workflows, t.recoveries
    with engine.connect() as conn:
        return {
            "evidence": [
                tuple(row)
                for row in conn.execute(
                    select(*[c for c in e.c if c.name != "id"], e.c.payload.is_(None)).order_by(
                        e.c.id
                    )
                )
            ],
            "steps": [
                tuple(row)
                for row in conn.execute(
                    select(
                        s.c.workflow_id, s.c.name, s.c.state, s.c.attempt, s.c.dispatched_at
                    ).order_by(s.c.workflow_id, s.c.name)
                )
            ],
            "workflows": [
                tuple(row)
                for row in conn.execute(
                    select(
                        *[c for c in w.c if c.name not in ("created_at", "updated_at")]
                    ).order_by(w.c.id)
                )
            ],
            "recoveries": [
                tuple(row)
                for row in conn.execute(
                    select(
                        r.c.workflow_id, r.c.step, r.c.repair, r.c.reason, r.c.evidence
                    ).order_by(r.c.id)
                )
            ],
        }


# -- the tests ----------------------------------------------------------------------------


def test_a_batch_gives_what_one_event_at_a_time_gives(
    engine: Engine, twin: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ledger.insert.new_workflow_id", numbered_ids())
    events = scenario(engine)
    with transaction(engine) as conn:
        batched = consume_completions(conn, events, NOW, "consumer")

    # The same ledger again, fed one event per call in the order a batch takes them.
    monkeypatch.setattr("ledger.insert.new_workflow_id", numbered_ids())
    assert scenario(twin) == events
    single: dict[int, Consumed] = {}
    for i in sorted(range(len(events)), key=lambda i: (events[i].workflow_id, i)):
        with transaction(twin) as conn:
            [single[i]] = consume_completions(conn, [events[i]], NOW, "consumer")

    assert [outcome(c) for c in batched] == [outcome(single[i]) for i in range(len(events))]
    assert [c.event for c in batched] == events
    # Every situation is in the batch (so the comparison above means something).
    assert [(c.classification, len(c.ready), len(c.repaired)) for c in batched] == [
        ("consumed", 2, 2),  # repaired: the slow path
        ("consumed", 2, 0),  # the fast path dispatches mail and log
        ("unmatched", 0, 0),  # no such workflow
        ("consumed", 1, 0),  # b's event dispatches the fan-in child c
        ("late", 0, 0),  # a newer attempt started
        ("duplicate", 0, 0),  # consumed by an earlier batch
        ("unmatched", 0, 0),  # no such step
        ("late", 0, 0),  # declared dropped
        ("consumed", 0, 0),  # not terminal
        ("duplicate", 0, 0),  # the same delivery earlier in this batch
        ("consumed", 0, 0),  # c went with b's event, earlier in the batch
        ("unmatched", 0, 0),  # ids longer than the ledger's: kept truncated
        ("consumed", 0, 0),  # children dispatched with the outcome
        ("consumed", 2, 0),  # attempt 2: mail and log
        ("unmatched", 0, 0),  # a step name no step has
    ]
    assert snapshot(engine) == snapshot(twin)
    matched = {c.event.workflow_id for c in batched if c.classification != "unmatched"}
    for wid in matched:
        assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)


def test_the_same_delivery_twice_in_one_batch_is_consumed_then_duplicate(engine: Engine) -> None:
    wid = Workflow.insert(fan(), engine).id
    complete(engine, wid, "root", "completed", 1, now=NOW)
    with transaction(engine) as conn:
        first, second = consume_completions(
            conn, [event(wid, "root"), event(wid, "root")], NOW, "consumer"
        )
    assert (first.classification, {r.step for r in first.ready}) == ("consumed", {"mail", "log"})
    assert (second.classification, second.ready) == ("duplicate", ())
    e = t.evidence
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.c.classification, e.c.source)
            .where(e.c.workflow_id == wid, e.c.kind == "event")
            .order_by(e.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [("consumed", "consumer"), ("duplicate", "consumer")]


def count_statements(conn: Connection, run: Any) -> tuple[Any, list[str]]:
    sent: list[str] = []

    def before(_c: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    sa_event.listen(conn, "before_cursor_execute", before)
    try:
        result = run()
    finally:
        sa_event.remove(conn, "before_cursor_execute", before)
    return result, sent


@pytest.mark.parametrize("size", [10, 40])
def test_a_batch_of_fast_path_events_costs_a_few_statements(engine: Engine, size: int) -> None:
    solo = Workflow.new("solo").add("only", Noop.new())
    ids = [Workflow.insert(solo, engine).id for _ in range(size)]
    for wid in ids:
        complete(engine, wid, "only", "completed", 1, now=NOW)
    events = [event(wid, "only") for wid in ids]
    with transaction(engine) as conn:
        got, sent = count_statements(
            conn, lambda: consume_completions(conn, events, NOW, "consumer")
        )
    assert [c.classification for c in got] == ["consumed"] * size
    # Rows read, event locks (PostgreSQL), accounted read, evidence, children.
    assert len(sent) <= 5, "\n".join(sent)
    with transaction(engine) as conn:
        again, sent = count_statements(
            conn, lambda: consume_completions(conn, events, NOW, "consumer")
        )
    assert [c.classification for c in again] == ["duplicate"] * size
    assert len(sent) <= 4, "\n".join(sent)  # duplicates read no children


@pytest.mark.postgres
def test_the_batch_takes_the_same_event_lock_as_everyone_else(pg_engine: Engine) -> None:
    """Held by `lock_event` (the reconciler's way), the lock stops a batch; held by a
    batch, it stops `lock_event`. A lock timeout shows the wait without any sleeping."""
    wid = Workflow.insert(fan(), pg_engine).id
    complete(pg_engine, wid, "root", "completed", 1, now=NOW)
    ev = event(wid, "root")
    other = event(wid, "mail")  # a different key in the same batch
    with pg_engine.connect() as holder, pg_engine.connect() as waiter:
        with holder.begin():
            lock_event(holder, ev.idempotency_key)
            with pytest.raises(OperationalError, match="lock timeout"), waiter.begin():
                waiter.execute(text("SET LOCAL lock_timeout = '200ms'"))
                consume_completions(waiter, [other, ev], NOW, "consumer")
        with waiter.begin():
            consume_completions(waiter, [other, ev], NOW, "consumer")
            with pytest.raises(OperationalError, match="lock timeout"), holder.begin():
                holder.execute(text("SET LOCAL lock_timeout = '200ms'"))
                lock_event(holder, ev.idempotency_key)


@pytest.mark.postgres
def test_a_batch_writes_its_evidence_with_one_statement_on_postgres(pg_engine: Engine) -> None:
    """Not an executemany (psycopg sends one statement per row): the rows travel as
    arrays, in batch order."""
    ids = [Workflow.insert(fan(), pg_engine).id for _ in range(3)]
    for wid in ids:
        complete(pg_engine, wid, "root", "completed", 1, now=NOW)
    events = [event(wid, "root") for wid in ids] + [event(ids[0], "root")]
    inserts: list[bool] = []

    def before(_c: Any, _cursor: Any, statement: str, _p: Any, _ctx: Any, many: bool) -> None:
        if statement.startswith("INSERT INTO streamflow_evidence"):
            inserts.append(many)

    with transaction(pg_engine) as conn:
        sa_event.listen(conn, "before_cursor_execute", before)
        consume_completions(conn, events, NOW, "consumer")
    assert inserts == [False]
    e = t.evidence
    with pg_engine.connect() as conn:
        rows = conn.execute(
            select(e.c.workflow_id, e.c.classification, e.c.created_at, e.c.attempt)
            .where(e.c.kind == "event")
            .order_by(e.c.id)
        ).all()
    # A batch takes its events in workflow-id order; the repeated delivery right after
    # the first of its workflow.
    expected = []
    for wid in sorted(ids):
        expected.append((wid, "consumed"))
        if wid == ids[0]:
            expected.append((wid, "duplicate"))
    assert [(r.workflow_id, r.classification) for r in rows] == expected
    assert {r.created_at for r in rows} == {NOW} and {r.attempt for r in rows} == {1}
