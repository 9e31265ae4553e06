"""Every statement the hot path sends is served by an index, on a ledger big enough for
the planner to mean it.

A throwaway PostgreSQL database is seeded with 5,000 finished workflows (50,000 steps and
the rows that go with them) and ANALYZEd; the hot path then runs through the ledger's own
functions while a `before_cursor_execute` listener records every statement; each one is
EXPLAINed with its own parameters. `python -m benchmarks.query_plans` prints the same plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from benchmarks.query_plans import (
    ALLOWED_SEQ_SCANS,
    Captured,
    Planned,
    explain_all,
    explain_text,
    run_hot_path,
    seed,
    throwaway_database,
)
from ledger.db import make_engine

pytestmark = pytest.mark.postgres

WORKFLOWS = 5000


@pytest.fixture(scope="module")
def seeded(postgres_url: str) -> Iterator[Engine]:
    with throwaway_database(postgres_url) as url:
        engine = make_engine(url)
        seed(engine, WORKFLOWS)
        yield engine
        engine.dispose()


@pytest.fixture(scope="module")
def planned(seeded: Engine) -> list[Planned]:
    return explain_all(seeded, run_hot_path(seeded))


def test_the_capture_saw_every_part_of_the_hot_path(planned: list[Planned]) -> None:
    phases = {p.captured.phase for p in planned}
    assert phases >= {
        "insert",
        "dispatch",
        "claim",
        "renew",
        "complete",
        "hand-off",
        "consume",
        "signal",
        "release",
        "callback",
        "cancel",
        "reconcile",
        "read",
        "prune",
    }
    # Every table of the ledger is read or written somewhere on the way.
    touched = {rel for p in planned for _, rel, _ in p.scans}
    assert "streamflow_steps" in touched and "streamflow_evidence" in touched


def test_no_statement_scans_a_ledger_table_sequentially(
    seeded: Engine, planned: list[Planned]
) -> None:
    bad = [p for p in planned if p.bad_seq_scans]
    report = "\n\n".join(
        f"[{p.captured.phase}] {p.captured.statement}\n{explain_text(seeded, p.captured)}"
        for p in bad
    )
    assert not bad, f"sequential scans of ledger tables:\n{report}"
    # No exceptions are needed today; any added must say why.
    assert all(reason.strip() for reason in ALLOWED_SEQ_SCANS.values())


def test_no_statement_scans_a_ledger_table_sequentially_once_prepared(
    seeded: Engine, planned: list[Planned]
) -> None:
    """psycopg prepares a statement on its fifth execution on a connection, and the server
    then runs a generic plan, blind to the parameters' values. A step's state bound as a
    parameter hid the partial indexes from it: every dispatcher pass read the whole
    steps table."""
    generic = explain_all(seeded, [p.captured for p in planned], generic=True)
    bad = [p for p in generic if p.bad_seq_scans]
    report = "\n\n".join(f"[{p.captured.phase}] {p.captured.statement}" for p in bad)
    assert not bad, f"sequential scans of ledger tables in generic plans:\n{report}"

    def indexes(fragment: str) -> set[str | None]:
        found = [p for p in generic if fragment in " ".join(p.captured.statement.split())]
        assert found, f"no captured statement contains {fragment!r}"
        return {idx for p in found for _, _, idx in p.scans}

    # What the dispatcher sends on every pass reads its partial indexes, not a whole-table
    # walk in some other index's order (which no sequential-scan check would catch).
    assert indexes("streamflow_steps.dispatched_at IS NULL ORDER BY") == {
        "ix_streamflow_steps_available_dispatched"
    }
    assert indexes("streamflow_steps.scheduled_at <=") == {"ix_streamflow_steps_retry_due"}


def test_the_hottest_statements_use_the_expected_indexes(planned: list[Planned]) -> None:
    def indexes(fragment: str) -> set[str | None]:
        found = [p for p in planned if fragment in " ".join(p.captured.statement.split())]
        assert found, f"no captured statement contains {fragment!r}"
        return {idx for p in found for _, _, idx in p.scans}

    # The workflow lock every transition takes first.
    assert "pk_streamflow_workflows" in indexes("FOR UPDATE")
    # The dispatcher's sweep reads the partial index of undispatched available steps.
    assert "ix_streamflow_steps_available_dispatched" in indexes(
        "streamflow_steps.dispatched_at IS NULL ORDER BY"
    )
    # Pruning walks finished workflows oldest first.
    assert "ix_streamflow_workflows_finished_at" in indexes("SKIP LOCKED")
    # The reconciler's look at steps finished since its last pass: `finished_at >= :since`
    # implies the index's `finished_at IS NOT NULL`, so the partial index serves it.
    finished = {"ix_streamflow_steps_finished_at", "bitmap: ix_streamflow_steps_finished_at"}
    assert indexes("p.finished_at >=") & finished


def test_a_statement_without_an_index_is_caught(seeded: Engine) -> None:
    """The detector itself: a lookup by a column nothing indexes is flagged."""
    probe = Captured(
        "SELECT name FROM streamflow_steps WHERE worker = %(worker)s", {"worker": "x"}, "probe"
    )
    (result,) = explain_all(seeded, [probe])
    assert result.bad_seq_scans == ["streamflow_steps"]


def test_a_partial_index_a_generic_plan_cannot_use_is_caught(seeded: Engine) -> None:
    """The generic-plan detector itself: with the state a parameter, the partial index
    of retries due serves the custom plan only."""
    probe = Captured(
        "SELECT name FROM streamflow_steps WHERE state = %(state)s::VARCHAR "
        "AND scheduled_at <= %(due)s::TIMESTAMP WITH TIME ZONE",
        {"state": "retryable", "due": datetime.now(UTC)},
        "probe",
    )
    (custom,) = explain_all(seeded, [probe])
    (generic,) = explain_all(seeded, [probe], generic=True)
    assert custom.bad_seq_scans == []
    assert generic.bad_seq_scans == ["streamflow_steps"]
