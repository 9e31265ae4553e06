"""A big workflow on tables whose statistics say workflows are small.

Right after a deployment, or when a workflow far bigger than the ones ANALYZE last saw is
inserted, the planner believes a workflow has a row or two in each table. Joined plainly,
the outcome's read of a step's children then scanned every step of the workflow for
each edge: on a 4,000-step chain, 25 s a hop (quadratic in the workflow's size). Each of
the children's and parents' rows must be read by primary key, whatever the statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, text

from benchmarks.query_plans import throwaway_database
from ledger.children import CHILDREN_WITH_DEPS
from ledger.consume import _READ_ROWS_PG, _UNDISPATCHED_CHILDREN_PG, accounted_query
from ledger.db import _LOCK_WORKFLOWS, make_engine
from ledger.transitions import _MARK_PG, _STEP_HISTORY_AND_CHILDREN
from streamflow import Workflow
from tests.workers import Noop

pytestmark = pytest.mark.postgres

CHAIN = 1500


@pytest.fixture(scope="module")
def stale(postgres_url: str) -> Iterator[tuple[Engine, str]]:
    with throwaway_database(postgres_url) as url:
        engine = make_engine(url)
        for _ in range(100):  # what ANALYZE sees: one step per workflow
            Workflow.insert(Workflow.new("small").add("a", Noop.new()), engine)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        chain = Workflow.new("chain")
        for i in range(CHAIN):
            chain = chain.add(f"s{i}", Noop.new(), deps=[f"s{i - 1}"] if i else [])
        yield engine, Workflow.insert(chain, engine).id
        engine.dispose()


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _step_scans(engine: Engine, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        compiled = statement.compile(dialect=conn.dialect)
        values = compiled.construct_params(params)
        plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string, values)
        root = plan.scalar_one()[0]["Plan"]
        conn.rollback()
    # The scans that find the rows (an UPDATE's ModifyTable node names its table too).
    return [
        n
        for n in _walk(root)
        if n.get("Relation Name") == "streamflow_steps" and n["Node Type"] != "ModifyTable"
    ]


@pytest.mark.parametrize(
    "statement",
    [
        _STEP_HISTORY_AND_CHILDREN,
        CHILDREN_WITH_DEPS,
        _UNDISPATCHED_CHILDREN_PG,
        _READ_ROWS_PG,
        _MARK_PG,
    ],
    ids=["outcome-read", "general", "consumer-dispatch", "consumer-read", "mark-dispatched"],
)
def test_every_step_row_is_read_by_its_primary_key(
    stale: tuple[Engine, str], statement: Any
) -> None:
    engine, wid = stale
    middle = f"s{CHAIN // 2}"
    params = {
        "b_wf": wid,
        "b_step": middle,
        "b_parent": middle,
        "b_wfs": [wid],
        "b_parents": [middle],
        "b_steps": [middle],
        "b_attempts": [1],
        "b_names": [middle],
        "b_now": datetime.now(UTC),
    }
    scans = _step_scans(engine, statement, params)
    assert scans, "the plan reads no step row"
    for scan in scans:
        assert scan["Node Type"] == "Index Scan", scan
        condition = scan.get("Index Cond", "")
        assert "workflow_id" in condition and "name" in condition, (
            f"{scan.get('Alias')}: read by {condition or scan['Node Type']}, "
            f"not by (workflow_id, name)"
        )


@pytest.fixture(scope="module")
def evidence_keys(stale: tuple[Engine, str]) -> list[tuple[str, str]]:
    """2,000 consumed events' evidence, written after ANALYZE saw none."""
    engine, wid = stale
    keys = [(wid, f"{wid}:s{i}:1:completed") for i in range(2000)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO streamflow_evidence (workflow_id, step, kind, classification, "
                "source, status, attempt, dedupe_key, created_at) "
                "SELECT CAST(:wid AS text), 's' || i, 'event', 'consumed', 'test', 'completed', 1, "
                "CAST(:wid AS text) || '\\:s' || i || '\\:1\\:completed', now() "
                "FROM generate_series(0, 1999) i"
            ),
            {"wid": wid},
        )
    return keys


def test_a_consumer_batch_reads_what_is_accounted_by_key(
    stale: tuple[Engine, str], evidence_keys: list[tuple[str, str]]
) -> None:
    """The consumer's read of the accounted events among a batch's: as a list of
    (workflow, key) pairs the planner walked the whole accounted index with the pairs as
    a filter (7 ms a batch of 36 on a 4,500-row table, growing with the ledger)."""
    engine, _ = stale
    batch = evidence_keys[::50]
    with engine.connect() as conn:
        statement, params = accounted_query(conn, batch)
        expanded = statement.compile(dialect=conn.dialect).construct_expanded_state(params)
        plan = conn.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) " + expanded.statement, expanded.parameters
        )
        root = plan.scalar_one()[0]["Plan"]
        conn.rollback()
    scans = [n for n in _walk(root) if n.get("Relation Name") == "streamflow_evidence"]
    assert scans, "the plan reads no evidence"
    for scan in scans:
        condition = scan.get("Index Cond", "")
        assert "workflow_id" in condition and "dedupe_key" in condition, (
            f"evidence read by {condition or scan['Node Type']}, "
            f"filtered by {scan.get('Filter', '')[:200]}"
        )


@pytest.fixture(scope="module")
def unanalyzed(postgres_url: str) -> Iterator[Engine]:
    """2,000 running workflows that ANALYZE never saw, as in a new deployment's first
    minutes (or wherever autovacuum is off or behind)."""
    with throwaway_database(postgres_url) as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO streamflow_workflows (id, name, state, semantics_version, "
                    "context, step_count, needs_review, created_at, updated_at) "
                    "SELECT lpad(to_hex(i), 32, '0'), 'w', 'running', 1, '{}', 1, false, "
                    "now(), now() FROM generate_series(1, 2000) i"
                )
            )
        yield engine
        engine.dispose()


def test_a_groups_workflows_are_locked_by_primary_key_in_the_order_given(
    unanalyzed: Engine,
) -> None:
    """The group commit's lock of its workflows. As `id = ANY(ids)` under a sort, the
    planner scanned every workflow (0.56 ms a group over W1's 1,500 workflows, in the
    group commit's single lane)."""
    with unanalyzed.connect() as conn:
        ids = [f"{i:032x}" for i in (7, 300, 301, 1200, 1999)]
        compiled = _LOCK_WORKFLOWS.compile(dialect=conn.dialect)
        plan = conn.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) " + compiled.string, compiled.construct_params({"b_ids": ids})
        )
        root = plan.scalar_one()[0]["Plan"]
        # The rows come back (and are locked) in the order of the ids given.
        locked = [row["id"] for row in conn.execute(_LOCK_WORKFLOWS, {"b_ids": ids}).mappings()]
        conn.rollback()
    assert locked == ids
    scans = [n for n in _walk(root) if n.get("Relation Name") == "streamflow_workflows"]
    assert scans and all(
        n["Node Type"] == "Index Scan" and n["Index Name"] == "pk_streamflow_workflows"
        for n in scans
    ), [(n["Node Type"], n.get("Index Name")) for n in scans]
