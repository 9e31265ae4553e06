"""The opt-in partitioning of the step and evidence tables, on disposable PostgreSQL
databases: rows already there are copied, workflows run the same as on plain tables, a
workflow-id query reads one partition, the hot path still reads indexes, the main
history's bookkeeping (`ensure_current`, `current_revision`) holds with the branch
applied, it can be undone — and a selection of the ledger suite passes on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

from benchmarks.query_plans import base_table, explain_all, run_hot_path, seed
from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.consume import CompletionEventView, consume_completions
from ledger.db import make_engine
from ledger.errors import LedgerError
from ledger.migrate import (
    VERSION_TABLE,
    current_revision,
    ensure_current,
    head_revision,
    partition_count,
    partition_ledger,
    partition_revision,
    unpartition_ledger,
    upgrade,
)
from streamflow import Dep, Workflow
from tests.integration.processes import ROOT
from tests.ledger.helpers import evidence, states
from tests.workers import Noop

pytestmark = pytest.mark.postgres

PARTITIONS = 4
PARTITIONED = ("streamflow_steps", "streamflow_evidence")


def _disposable(postgres_url: str, revision: str | None = None) -> Iterator[tuple[str, Engine]]:
    base = make_url(postgres_url)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"streamflow_part_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        upgrade(engine, revision)
        yield url, engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def plain(postgres_url: str) -> Iterator[tuple[str, Engine]]:
    yield from _disposable(postgres_url)


@pytest.fixture
def partitioned(postgres_url: str) -> Iterator[tuple[str, Engine]]:
    for url, engine in _disposable(postgres_url):
        partition_ledger(engine, PARTITIONS)
        yield url, engine


# -- a workload to compare -----------------------------------------------------------------


def scenario(engine: Engine) -> list[dict[str, Any]]:
    """Workflows through the ledger's functions: fan-in with a failure and a continue
    edge, duplicate and conflicting outcomes, a claim and consumed events, a signal, a
    cancel. Returns what each ended as, without the random ids."""
    fan = (
        Workflow.new(name="fan", on_finish=Noop.new({}))
        .add("root", Noop.new({}))
        .add("left", Noop.new({"root": Workflow.result("root")}), deps=["root"])
        .add("right", Noop.new({}), deps=["root"])
        .add("join", Noop.new({}), deps=["left", "right"])
        .add("cleanup", Noop.new({}), deps=[Dep("join", policy="continue")])
    )
    ids = []
    wid = Workflow.insert(fan, engine).id
    now = datetime.now(UTC)
    with engine.begin() as conn:
        claim = claim_step(conn, wid, "root", owner="w", lease_seconds=30, now=now)
        assert isinstance(claim, Claim)
    Workflow.complete_step(engine, wid, "root", status="completed", payload={"n": 1})
    key = f"{wid}:root:1:completed"
    event = CompletionEventView(wid, "root", "completed", 1, key)
    for _ in range(2):  # consumed, then a duplicate delivery
        with engine.begin() as conn:
            consume_completions(conn, [event], now, "consumer")
    Workflow.complete_step(engine, wid, "root", status="completed", payload={"n": 1})
    Workflow.complete_step(engine, wid, "left", status="completed", payload={"l": True})
    Workflow.complete_step(engine, wid, "left", status="failed")  # ambiguous
    Workflow.complete_step(engine, wid, "right", status="failed")
    Workflow.complete_step(engine, wid, "cleanup", status="completed")
    ids.append(wid)

    signalled = (
        Workflow.new(name="signalled")
        .add("a", Noop.new({}))
        .add("b", Noop.new({}), deps=["a"], await_signal="go")
    )
    wid = Workflow.insert(signalled, engine).id
    Workflow.signal(engine, wid, "go", {"ok": True}, dedupe_key="k")
    Workflow.signal(engine, wid, "go", {"ok": True}, dedupe_key="k")  # duplicate
    Workflow.complete_step(engine, wid, "a", status="completed")
    Workflow.complete_step(engine, wid, "b", status="completed")
    ids.append(wid)

    cancelled = (
        Workflow.new(name="cancelled").add("a", Noop.new({})).add("b", Noop.new({}), deps=["a"])
    )
    wid = Workflow.insert(cancelled, engine).id
    Workflow.cancel(engine, wid, reason="test")
    Workflow.cancel(engine, wid, reason="again")
    Workflow.complete_step(engine, wid, "a", status="completed")  # late
    ids.append(wid)

    out = []
    for wid in ids:
        record = Workflow.get(engine, wid)
        out.append(
            {
                "name": record.name,
                "state": record.state,
                "outcome": record.outcome,
                "counters": record.counters,
                "needs_review": record.needs_review,
                "steps": states(engine, wid),
                "results": Workflow.results(engine, wid),
                "evidence": evidence(engine, wid),
                "signals": [(s.classification, s.reason) for s in Workflow.signals(engine, wid)],
                "cancels": [r.effect for r in Workflow.cancel_requests(engine, wid)],
                "callback": getattr(Workflow.callback(engine, wid), "state", None),
            }
        )
    return out


def _scans(engine: Engine, sql: str, **params: Any) -> set[str]:
    with engine.connect() as conn:
        plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + sql), params).scalar_one()[0]

    def walk(node: dict[str, Any]) -> Iterator[str]:
        if "Relation Name" in node:
            yield node["Relation Name"]
        for child in node.get("Plans", []):
            yield from walk(child)

    return set(walk(plan["Plan"]))


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            tbl.name: conn.execute(select(func.count()).select_from(tbl)).scalar_one()
            for tbl in t.metadata.sorted_tables
        }


# -- the tests --------------------------------------------------------------------------------


def test_partitioning_copies_the_rows_and_keeps_the_main_history_current(
    plain: tuple[str, Engine],
) -> None:
    _, engine = plain
    before_run = scenario(engine)
    # Enough workflows that their random ids land in every partition: with 20 (and the
    # scenario's 3) over 4 partitions one stayed empty about once in 200 runs; with 200
    # the chance is about 1e-25.
    for i in range(200):
        Workflow.insert(Workflow.new(name=f"more{i}").add("a", Noop.new({})), engine)
    before = _counts(engine)
    rows_before = {name: _rows(engine, name) for name in PARTITIONED}
    partition_ledger(engine, PARTITIONS)

    with engine.connect() as conn:
        assert partition_count(conn, "streamflow_steps") == PARTITIONS
        assert partition_count(conn, "streamflow_evidence") == PARTITIONS
        assert partition_count(conn, "streamflow_attempts") == 0
        assert current_revision(conn) == head_revision()
        assert partition_revision(conn) == "p0001"
    ensure_current(engine)  # the branch applied does not make the schema "not ready"
    upgrade(engine)  # and a plain `streamflow migrate` afterwards changes nothing
    with engine.connect() as conn:
        assert partition_revision(conn) == "p0001"
    assert _counts(engine) == before
    # Every row went to the partition its workflow id hashes to, and reads the same.
    assert {name: _rows(engine, name) for name in PARTITIONED} == rows_before
    with engine.connect() as conn:
        spread = conn.execute(
            text("SELECT count(DISTINCT tableoid) FROM streamflow_steps")
        ).scalar_one()
    assert spread == PARTITIONS
    assert [r["name"] for r in before_run] == ["fan", "signalled", "cancelled"]


def _rows(engine: Engine, name: str) -> list[tuple[Any, ...]]:
    table = t.metadata.tables[name]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key))]


def _workflow_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(t.workflows.c.id).order_by(t.workflows.c.created_at)).scalars()
        )


def test_a_ledger_partitioned_at_0006_takes_the_later_revisions(postgres_url: str) -> None:
    """The partitioning branch needs 0006; a ledger partitioned then must still take the
    main history's later revisions (0007 rebuilds an index of the partitioned steps)."""
    for _, engine in _disposable(postgres_url, revision="0006"):
        partition_ledger(engine, PARTITIONS)
        upgrade(engine)
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            assert partition_count(conn) == PARTITIONS
            rows = conn.execute(
                text(
                    "SELECT c.relname, pg_get_expr(x.indpred, x.indrelid) FROM pg_index x"
                    " JOIN pg_class c ON c.oid = x.indexrelid"
                    " WHERE c.relname LIKE 'streamflow_steps%finished_at%'"
                    " OR c.relname = 'ix_streamflow_steps_finished_at'"
                )
            ).all()
        # The partitioned index and one per partition, each over finished steps only.
        assert len(rows) == PARTITIONS + 1
        assert all(predicate == "(finished_at IS NOT NULL)" for _, predicate in rows)


def test_workflows_run_the_same_on_partitioned_tables(
    plain: tuple[str, Engine], partitioned: tuple[str, Engine]
) -> None:
    expected = scenario(plain[1])
    got = scenario(partitioned[1])
    assert got == expected
    # The scenario produced what it is meant to compare.
    fan = got[0]
    assert fan["outcome"] == "failed" and fan["steps"]["cleanup"] == "completed"
    assert {e["classification"] for e in fan["evidence"]} >= {"consumed", "duplicate", "ambiguous"}


def test_a_workflow_id_query_reads_one_partition(partitioned: tuple[str, Engine]) -> None:
    _, engine = partitioned
    scenario(engine)
    wid = _workflow_ids(engine)[0]
    steps = _scans(engine, "SELECT * FROM streamflow_steps WHERE workflow_id = :w", w=wid)
    assert len(steps) == 1 and base_table(steps.pop()) == "streamflow_steps"
    evidence_scans = _scans(
        engine, "SELECT * FROM streamflow_evidence WHERE workflow_id = :w ORDER BY id", w=wid
    )
    (only,) = evidence_scans
    assert only.startswith("streamflow_evidence_p")
    # Without the key every partition is read: the pruning above is real.
    assert len(_scans(engine, "SELECT * FROM streamflow_steps WHERE queue = 'x'")) == PARTITIONS


def test_the_hot_path_reads_indexes_on_a_partitioned_ledger(
    partitioned: tuple[str, Engine],
) -> None:
    _, engine = partitioned
    seed(engine, 5000)
    planned = explain_all(engine, run_hot_path(engine))
    bad = [(p.captured.phase, p.captured.statement[:120], p.bad_seq_scans) for p in planned]
    assert [b for b in bad if b[2]] == []
    # Statements keyed by a workflow id parameter touch one partition of the steps table.
    # (A consumer batch reads the steps of many workflows, keyed by a column of its own
    # pairs: PostgreSQL prunes those partitions as it executes, not in the plan.)
    keyed = [
        p
        for p in planned
        if "streamflow_steps.workflow_id = %(" in p.captured.statement
        and "streamflow_steps.name = " in p.captured.statement
    ]
    assert keyed
    for p in keyed:
        parts = {rel for _, rel, _ in p.scans if rel.startswith("streamflow_steps_p")}
        assert len(parts) <= 1, (p.captured.statement, parts)


def test_it_can_be_undone_to_exactly_the_plain_schema(partitioned: tuple[str, Engine]) -> None:
    _, engine = partitioned
    expected = scenario(engine)
    before = _counts(engine)
    unpartition_ledger(engine)
    with engine.connect() as conn:
        assert partition_count(conn) == 0 and partition_revision(conn) is None
        assert current_revision(conn) == head_revision()
        ctx = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        assert compare_metadata(ctx, t.metadata) == []
    assert _counts(engine) == before
    # New evidence ids continue after the old ones: the sequence came through.
    again = scenario(engine)
    assert again == expected


def test_sqlite_refuses(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(engine)
    with pytest.raises(LedgerError, match="needs PostgreSQL"):
        partition_ledger(engine, 4)
    engine.dispose()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({"COLUMNS": "200", "NO_COLOR": "1"})
    return subprocess.run(
        [sys.executable, "-m", "streamflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_migrate_command(plain: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = plain
    run = _cli("migrate", "--partition-ledger", "--partitions", "3", "--database-url", url)
    assert run.returncode == 0, run.stderr
    assert "into 3 partitions" in run.stdout
    with engine.connect() as conn:
        assert partition_count(conn) == 3
    again = _cli("migrate", "--partition-ledger", "--partitions", "3", "--database-url", url)
    assert again.returncode == 0 and "already partitioned (3 partitions)" in again.stdout
    plain_run = _cli("migrate", "--database-url", url)
    assert plain_run.returncode == 0 and "nothing to do" in plain_run.stdout

    sqlite = f"sqlite:///{tmp_path / 'l.db'}"
    refused = _cli("migrate", "--partition-ledger", "--database-url", sqlite)
    assert refused.returncode == 2
    assert "needs PostgreSQL" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "l.db").exists() or _sqlite_is_empty(sqlite)


def _sqlite_is_empty(url: str) -> bool:
    engine = make_engine(url)
    with engine.connect() as conn:
        empty = current_revision(conn) is None
    engine.dispose()
    return empty


#: Ledger tests re-run on a partitioned database (their PostgreSQL half).
LEDGER_SELECTION = (
    "tests/ledger/test_complete_step.py",
    "tests/ledger/test_signals.py",
    "tests/ledger/test_cancel.py",
    "tests/ledger/test_prune.py",
    "tests/ledger/test_reconciler.py",
)


def test_a_selection_of_the_ledger_suite_passes_on_a_partitioned_ledger() -> None:
    env = dict(os.environ, STREAMFLOW_TEST_PARTITIONS=str(PARTITIONS))
    run = subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "postgres"),
            *LEDGER_SELECTION,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    tail = "\n".join(run.stdout.splitlines()[-15:])
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    assert passed is not None and int(passed.group(1)) >= 50, tail
