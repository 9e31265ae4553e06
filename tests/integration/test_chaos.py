"""The chaos suite's bounded CI selection (the full matrix: `python -m chaos --matrix`).

Each test runs the chaos harness (chaos/harness.py): a seeded mix of workflows through
real `streamflow consume` and `streamflow worker` processes on throwaway PostgreSQL
databases and a disposable `redis-server`, once without faults (the reference, shared by
the tests of this module) and once with, then checks every invariant of the design brief
(chaos/invariants.py). A failing test prints the whole report and keeps the logs.

- the headline: 30% of completion messages dropped and 20% duplicated; every workflow
  reaches the reference outcome and every invariant holds;
- Redis killed mid-run and restarted empty: everything completes from the ledger alone;
- every kind of message fault on both streams at once: every fault is matched to the
  evidence or recovery row that makes it visible, and the counts agree.

Two regression tests reduce what the suite found (see their docstrings; both fixed since):
a stale ready message that finds its step available again claimed it without leaving any
evidence (and the fresh dispatch it overtook, if lost, left none either); and the
reconciler's reset after Redis lost its data could undispatch a step without recording it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text, update
from sqlalchemy.pool import NullPool

from chaos.harness import ChaosOptions, RunResult, run_chaos, run_reference
from chaos.report import Report
from chaos.workers import ChaosStep
from ledger import tables as t
from ledger.reconcile import undispatch_all_available
from streamflow import Workflow

pytestmark = pytest.mark.postgres

#: Small enough for CI, big enough that every shape of workflow appears several times.
BASE = ChaosOptions(
    workflows=48,
    seed=7,
    workers=2,
    concurrency=4,
    reconcile_every=0.5,
    redispatch_after=2.0,
    dropped_after=2.0,
    timeout=90.0,
    postgres_url=os.environ.get(
        "STREAMFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
)


def now() -> datetime:
    return datetime.now(UTC)


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def services() -> None:
    """A redis-server binary to start and a PostgreSQL to create databases on."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server not installed")
    probe = create_engine(BASE.postgres_url, poolclass=NullPool)
    try:
        with probe.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        _unavailable(f"PostgreSQL not reachable: {exc}")
    finally:
        probe.dispose()


@pytest.fixture(scope="module")
def reference(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunResult]:
    result = run_reference(replace(BASE, workdir=str(tmp_path_factory.mktemp("reference"))))
    assert result.converge_s is not None, "the fault-free reference run did not converge"
    yield result


def run(options: ChaosOptions, reference: RunResult, tmp_path: Path) -> Report:
    # Logs, the fault log and the perform logs stay under pytest's tmp_path.
    report = run_chaos(replace(options, workdir=str(tmp_path)), reference=reference)
    assert report.passed, "\n" + report.render()
    return report


def faults(report: Report, kind: str, stream: str) -> int:
    return report.faults.get(kind, {}).get(stream, 0)


@pytest.mark.timeout(300)
def test_dropped_and_duplicated_completions_change_no_outcome(
    reference: RunResult, tmp_path: Path
) -> None:
    options = replace(BASE, scenario="ci-headline", drop=0.3, dup=0.2, streams=("completion",))
    report = run(options, reference, tmp_path)
    # The faults really happened, and only where asked.
    assert faults(report, "drop", "completion") > 0
    assert faults(report, "duplicate", "completion") > 0
    assert not any(faults(report, k, "ready") for k in report.faults)
    # Every drop was declared `dropped` by the reconciler, every duplicate kept.
    assert report.evidence.get("event/dropped", 0) >= faults(report, "drop", "completion")
    repeats = report.evidence.get("event/duplicate", 0) + report.evidence.get("event/late", 0)
    assert repeats >= faults(report, "duplicate", "completion")
    assert {i.name for i in report.invariants} >= {
        "perform_once",
        "one_result",
        "dependencies",
        "same_outcome",
        "faults_visible",
        "no_write_lost",
    }


@pytest.mark.timeout(300)
def test_redis_killed_and_restarted_empty_everything_completes(
    reference: RunResult, tmp_path: Path
) -> None:
    report = run(replace(BASE, scenario="ci-flush-redis", flush_redis=True), reference, tmp_path)
    assert [p.kind for p in report.process_faults] == ["flush-redis"]
    # The reconciler noticed Redis came back empty (its epoch marker gone) and re-drove
    # from the ledger; a recovery row exists only for steps that then needed dispatching.
    assert report.pass_repairs.get("streams_reset", 0) >= 1


@pytest.mark.timeout(300)
def test_every_injected_fault_is_matched_to_a_row(reference: RunResult, tmp_path: Path) -> None:
    options = replace(
        BASE,
        scenario="ci-every-fault",
        drop=0.2,
        dup=0.15,
        delay=0.1,
        replay=0.1,
        reorder=0.3,
        delay_ms=(200, 2500),
        replay_after_ms=(300, 2500),
    )
    report = run(options, reference, tmp_path)
    matching = report.matching
    assert matching.injected > 0
    assert matching.matched == matching.injected
    injected = {(m.stream, m.kind) for m in matching.lines if m.injected}
    for stream in ("completion", "ready"):
        for kind in ("drop", "duplicate", "replay", "delay"):
            assert (stream, kind) in injected, f"no {stream} {kind} fault was injected"
    # Both sides counted: each fault used a row of its class, and no row twice.
    for row in matching.rows:
        assert row.used <= row.total, row


@pytest.mark.timeout(300)
def test_a_stale_ready_message_that_claims_its_step_is_on_record(
    services: None, tmp_path: Path
) -> None:
    """Regression for the first gap the suite found (fixed in ledger/claims.py claim_step).

    One workflow whose step `flaky` fails its first attempt. Its first ready message is
    replayed 2.5 s later, and the ready message of its retry (dispatched 1.0-1.6 s after
    the first, when the 1 s +-20% backoff is up) is dropped. The replayed copy arrives
    while the step is available again, before the 2 s re-dispatch deadline, and claims
    attempt 2. That claim must be on record (`replayed` delivery evidence, reason
    `stale_message_claimed`); it also accounts for the dropped message, which nobody had
    to send again. Before the fix both faults left no trace.

    No extra reconciler (dropped_after=None), so every root and retry dispatch comes from
    the one consumer process whose message counts the script refers to.
    """
    options = replace(
        BASE,
        scenario="stale-ready-claims",
        workflows=1,
        shapes=("retry",),
        script={"ready:flaky#1": "replay", "ready:flaky#2": "drop"},
        replay_after_ms=(2500, 2500),
        dropped_after=None,
        settle=8.0,
        workdir=str(tmp_path),
    )
    report = run_chaos(options)
    assert report.passed, "\n" + report.render()
    drops = next(m for m in report.matching.lines if (m.stream, m.kind) == ("ready", "drop"))
    assert sum(drops.notes.values()) == 1, "\n" + report.render()


def test_streams_reset_records_every_step_it_undispatches(pg_engine: Engine) -> None:
    """Regression for the second bug the suite found (fixed in ledger/reconcile.py
    undispatch_all_available), from the matrix's flush-redis scenario: a worker's
    completion commits a released step as dispatched while the reconciler's reset runs.
    Whatever the reset undispatched it must return, so each gets its recovery row; before
    the fix (a SELECT, then a separate UPDATE) the step committed in between was
    undispatched and re-sent with nothing on record."""
    before = Workflow.insert(Workflow.new("before").add("s", ChaosStep.new({})), pg_engine).id
    during = Workflow.insert(Workflow.new("during").add("s", ChaosStep.new({})), pg_engine).id
    s = t.steps

    def dispatch(workflow_id: str) -> None:
        with pg_engine.begin() as conn:
            conn.execute(
                update(s).where(s.c.workflow_id == workflow_id).values(dispatched_at=now())
            )

    dispatch(before)
    with pg_engine.begin() as conn:
        real = conn.execute
        statements: list[object] = []

        def execute(statement: Any, *args: Any, **kwargs: Any) -> Any:
            result = real(statement, *args, **kwargs)
            statements.append(statement)
            if len(statements) == 1:  # after the reset's first statement
                dispatch(during)
            return result

        conn.execute = execute  # type: ignore[method-assign]
        returned = {r.workflow_id for r in undispatch_all_available(conn)}
    with pg_engine.connect() as conn:
        undispatched = set(
            conn.execute(select(s.c.workflow_id).where(s.c.dispatched_at.is_(None))).scalars()
        )
    # Every step the reset undispatched is returned, to get its recovery row.
    assert before in returned
    assert returned == undispatched


def test_the_fault_transport_does_and_logs_what_its_plan_says(tmp_path: Path) -> None:
    """The seam's wrapper on its own, on fakeredis: scripted fates happen, and each is
    logged with the message's identity once it took effect."""
    import fakeredis

    from chaos.faults import FaultPlan, FaultyTransport, read_fault_log
    from streamflow.streams.transport import RedisTransport

    log = tmp_path / "faults.jsonl"
    plan = FaultPlan(
        seed=1,
        log=str(log),
        label="test",
        script={"ready:a#1": "drop", "ready:b#1": "duplicate", "completion:c#1": "replay"},
        replay_after_ms=(0, 0),
    )
    assert FaultPlan.from_json(plan.to_json()) == plan
    client = fakeredis.FakeRedis(decode_responses=True)
    faulty = FaultyTransport.from_plan(RedisTransport(client), plan.to_json())

    def ready(step: str) -> dict[str, str]:
        return {"v": "1", "kind": "ready", "workflow_id": "w", "step": step, "queue": "q",
                "at_ms": "1"}  # fmt: skip

    faulty.add_many([("{p}:ready:q", ready("a")), ("{p}:ready:q", ready("b"))])
    completion = {"v": "1", "kind": "completion", "workflow_id": "w", "step": "c",
                  "status": "completed", "attempt": "1", "key": "w:c:1:completed",
                  "at_ms": "1"}  # fmt: skip
    faulty.add("{p}:completions", completion)

    def logged() -> list[tuple[str, str, str]]:
        return sorted((x["kind"], x["phase"], x["step"]) for x in read_fault_log(log))

    deadline = time.monotonic() + 10
    while ("replay", "injected", "c") not in logged() and time.monotonic() < deadline:
        time.sleep(0.01)
    ready_entries = client.xrange("{p}:ready:q") or []
    assert [fields["step"] for _, fields in ready_entries if fields] == ["b", "b"]
    assert len(client.xrange("{p}:completions") or []) == 2
    assert logged() == [
        ("drop", "injected", "a"),
        ("duplicate", "injected", "b"),
        ("replay", "injected", "c"),
        ("replay", "scheduled", "c"),
    ]
    keys = {x.get("key") for x in read_fault_log(log) if x["stream"] == "completion"}
    assert keys == {"w:c:1:completed"}
    faulty.log.close()
    client.close()
