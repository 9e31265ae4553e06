"""The `streamflow` command, run for real in a subprocess, in a scratch directory.

Each run gets an environment with every STREAMFLOW_* variable removed, so the embedded
default (`sqlite:///./streamflow.db` in the working directory) is what a newcomer gets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Dep, Explain, Workflow
from tests.engine_app import Add, Echo
from tests.integration.processes import ROOT, wait_for
from tests.workers import Noop

EMBEDDED_NOTICE = "sqlite:///./streamflow.db"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_lines(self) -> list[str]:
        """stderr without the embedded-default notice."""
        return [line for line in self.err.splitlines() if line and EMBEDDED_NOTICE not in line]


def streamflow(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    clean.update({"COLUMNS": "200", "NO_COLOR": "1"})
    clean.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "streamflow", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(run: Run, *, code: int, contains: str) -> None:
    assert run.code == code, (run.out, run.err)
    assert "Traceback" not in run.err + run.out
    assert len(run.error_lines) == 1, run.err
    line = run.error_lines[0]
    assert line.startswith("error: ")
    assert contains in line


# -- the demo on the embedded default ----------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo_text(demo_dir: Path) -> Run:
    return streamflow(demo_dir, "demo")


@pytest.fixture(scope="module")
def demo_json(demo_dir: Path, demo_text: Run) -> dict[str, Any]:
    # Runs after the text demo, in the same directory: a second run works too.
    run = streamflow(demo_dir, "demo", "--json")
    assert run.code == 0, run.err
    data: dict[str, Any] = run.json()
    return data


def by_key(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["key"]: w for w in data["workflows"]}


def test_demo_creates_the_embedded_database_and_says_so(demo_dir: Path, demo_text: Run) -> None:
    assert demo_text.code == 0, demo_text.err
    assert (demo_dir / "streamflow.db").exists()
    assert "embedded default database sqlite:///./streamflow.db" in demo_text.err
    assert "STREAMFLOW_DATABASE_URL" in demo_text.err
    assert "--database-url" in demo_text.err
    assert "Traceback" not in demo_text.err
    # The engine's JSON log lines stay off the screen.
    assert not [line for line in demo_text.err.splitlines() if line.lstrip().startswith("{")]


def test_demo_runs_the_workflows_through_the_engine(demo_text: Run) -> None:
    out = demo_text.out
    assert "No engine runs workers yet" not in out
    # Not a terminal: no animation, the final view printed once.
    assert out.count("Running 5 workflows through the engine in this process") == 1
    assert "stream (fakeredis)" in out
    assert "5 of 5 workflows finished" in out
    # 1. customer sync: the placeholder as stored, and resolved for the worker
    assert '"customer": {"$streamflow.result": "fetch_customer"}' in out
    assert '"customer": {"customer_id": 42, "email": "customer42@example.com"' in out
    assert '"billed_to": "customer42@example.com"' in out
    # 2. fan-out / fan-in
    assert "[joins 4: summarize_eu, summarize_us, summarize_apac, summarize_latam]" in out
    # 3. the failure cascade
    assert "RuntimeError: card declined for 4999 cents" in out
    assert "archive_receipt cancelled by: send_receipt (root cause: charge_card)" in out
    assert "release_hold ran anyway and returned" in out
    # 4. the retry
    assert "TimeoutError: rates API timed out" in out
    # 5. the by-hand replay
    assert "By hand, after the engine run" in out
    assert "duplicate" in out and "conflicts_with_recorded_outcome" in out
    assert "workflow send_invoice: finished, outcome completed  (issue_invoice needs review)" in out
    # 6. the explain report, label first
    assert out.index("CANCELLED") < out.index("cancelled_by_dependency")
    assert "The engine's own counts" in out
    assert "the engine logged" not in out  # a first run on a fresh database: no warnings
    assert "streamflow explain " in out and "streamflow status " in out
    assert "streamflow run --app myapp --queues default" in out


def test_demo_json_records_what_the_engine_did(demo_json: dict[str, Any]) -> None:
    assert demo_json["database"] == {"url": "sqlite:///./streamflow.db", "embedded": True}
    assert demo_json["streams"] == "an in-process stream (fakeredis)"
    # A second run on the same database: the reconciler sees that the in-process stream
    # is new and dispatches again (a warning it logs); nothing else may complain.
    assert {(line["level"], line["event"]) for line in demo_json["engine_log"]} <= {
        ("warning", "reconciler.streams_reset"),
        ("warning", "reconciler.repaired"),
    }
    wfs = by_key(demo_json)
    assert {k: (w["state"], w["outcome"]) for k, w in wfs.items()} == {
        "customer_sync": ("finished", "completed"),
        "fan_out": ("finished", "completed"),
        "failure": ("finished", "failed"),
        "retry": ("finished", "completed"),
        "evidence": ("finished", "completed"),
    }

    sync = wfs["customer_sync"]
    customer = {"customer_id": 42, "email": "customer42@example.com", "plan": "pro"}
    assert sync["results"]["fetch_customer"] == customer
    assert demo_json["customer_sync"]["sync_billing_args_resolved"]["customer"] == customer
    assert sync["results"]["sync_billing"]["invoice_id"] == "inv_0042"
    assert sync["results"]["cleanup"]["dependency_results_seen"] == ["sync_billing"]
    assert {"parent": "sync_billing", "child": "cleanup", "policy": "continue"} in sync["edges"]

    fan = wfs["fan_out"]
    summaries = [v for k, v in fan["results"].items() if k.startswith("summarize_")]
    assert len(summaries) == 4
    merged = fan["results"]["merge_reports"]
    assert merged["revenue"] == sum(s["revenue"] for s in summaries)
    assert merged["orders"] == sum(s["orders"] for s in summaries)
    assert {(s["state"], s["attempt"]) for s in fan["steps"]} == {("completed", 1)}

    failure = {s["name"]: s for s in wfs["failure"]["steps"]}
    assert failure["charge_card"]["state"] == "failed"
    assert failure["release_hold"]["state"] == "completed"
    assert demo_json["cancelled"] == [
        {
            "workflow": "failure",
            "step": "send_receipt",
            "cancelled_by": "charge_card",
            "root_cause": "charge_card",
        },
        {
            "workflow": "failure",
            "step": "archive_receipt",
            "cancelled_by": "send_receipt",
            "root_cause": "charge_card",
        },
    ]
    [charge] = demo_json["failure"]["attempts"]
    assert (charge["status"], charge["reason"]) == ("failed", "attempts_exhausted")

    attempts = demo_json["retry"]["attempts"]
    assert [(a["attempt"], a["status"], a["source"]) for a in attempts] == [
        (1, "retryable", "worker"),
        (2, "completed", "worker"),
    ]
    assert "rates API timed out" in attempts[0]["payload"]["error"]
    retry = {s["name"]: s for s in wfs["retry"]["steps"]}
    assert retry["fetch_rates"]["attempt"] == 2
    assert wfs["retry"]["results"]["publish_prices"] == {"published": 3}

    replay = demo_json["replay"]
    assert replay["step"] == "issue_invoice"
    assert [r["classification"] for r in replay["reports"]] == ["duplicate", "ambiguous"]
    # (A ready message sent twice would add a `delivery` row; that depends on timing.)
    assert [
        (e["kind"], e["classification"], e["source"])
        for e in replay["evidence"]
        if e["kind"] != "delivery"
    ] == [
        ("event", "consumed", "consumer"),
        ("completion", "duplicate", "api"),
        ("completion", "ambiguous", "api"),
    ]
    # The first result stands; the workflow is flagged for review.
    assert wfs["evidence"]["results"]["issue_invoice"]["invoice_id"] == "inv_0007"
    assert wfs["evidence"]["needs_review"] is True

    # 3 + 6 + 2 (two were cancelled) + 4 (one retry) + 2 claims: each attempt ran once,
    # whatever ready messages were sent twice.
    worker = demo_json["engine"]["worker"]
    assert (worker["claimed"], worker["completed"], worker["retried"], worker["failed"]) == (
        17,
        15,
        1,
        1,
    )

    explain = demo_json["explain"]
    assert explain["step"] == "archive_receipt"
    assert explain["label"] == "Cancelled"
    assert explain["blocker_codes"] == ["cancelled_by_dependency"]
    assert (explain["cancelled_by_step"], explain["cancel_root_step"]) == (
        "send_receipt",
        "charge_card",
    )


def test_status_and_explain_on_what_the_demo_left(
    demo_dir: Path, demo_json: dict[str, Any]
) -> None:
    wfs = by_key(demo_json)
    fan_id = wfs["fan_out"]["workflow_id"]

    status = streamflow(demo_dir, "status", fan_id, "--json")
    assert status.code == 0, status.err
    data = status.json()
    assert data["workflow"]["outcome"] == "completed"
    assert data["workflow"]["counters"]["completed"] == 6
    steps = {s["name"]: s for s in data["steps"]}
    regions = ["summarize_eu", "summarize_us", "summarize_apac", "summarize_latam"]
    assert steps["load_orders"]["children"] == regions
    assert [d["step"] for d in steps["merge_reports"]["deps"]] == regions
    assert {s["label"] for s in data["steps"]} == {"Done"}

    tree = streamflow(demo_dir, "status", fan_id)
    assert tree.code == 0, tree.err
    # The fan-in step appears under each of its four parents, marked.
    assert tree.out.count("merge_reports") == 4
    assert tree.out.count("[joins 4: " + ", ".join(regions) + "]") == 4

    evidence_id = wfs["evidence"]["workflow_id"]
    explain = streamflow(demo_dir, "explain", evidence_id, "issue_invoice")
    assert explain.code == 0, explain.err
    label_at = explain.out.index("NEEDS REVIEW")
    assert label_at < explain.out.index("a conflicting outcome was reported")
    assert label_at < explain.out.index("ambiguous_outcome")


def test_demo_on_the_embedded_database_refuses_a_redis_url(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "demo", "--redis-url", "redis://127.0.0.1:6379/0")
    assert_one_line_error(run, code=2, contains="--redis-url needs --database-url")


# -- `streamflow run` on the embedded default --------------------------------------------


@pytest.mark.parametrize(
    ("flags", "handed_off"), [([], 2), (["--no-hand-off"], 0)], ids=["hand-off", "no-hand-off"]
)
def test_run_executes_a_workflow_on_the_embedded_default(
    tmp_path: Path, flags: list[str], handed_off: int
) -> None:
    """`streamflow run` with no URLs at all: the SQLite file in its working directory and
    an in-process stream. A workflow inserted with the library runs to completion, and
    SIGTERM stops the process cleanly. With hand-off (the default) the chain's b and c
    run on the thread that released them; with --no-hand-off every step goes through the
    ready stream."""
    engine = make_engine(f"sqlite:///{tmp_path / 'streamflow.db'}")
    # Migrated before the process starts, so two first-time migrations cannot race.
    upgrade(engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = ["run", "--app", "tests.engine_app", "--queues", "default", *flags]
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamflow", *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(
            lambda: "worker.started" in log_path.read_text(),
            20,
            "the worker to start",
            on_timeout=log_path.read_text,
        )
        wf = (
            Workflow.new("run_embedded", {})
            .add("a", Add.new({"values": [1, 2]}))
            .add("b", Add.new({"base": Workflow.result("a"), "values": [10]}), deps=["a"])
            .add("c", Echo.new({}), deps=["b"])
        )
        workflow_id = Workflow.insert(wf, engine).id
        record = wait_for(
            lambda: (r := Workflow.get(engine, workflow_id)).finished and r,
            20,
            "the workflow to finish",
            on_timeout=log_path.read_text,
        )
        results = Workflow.results(engine, workflow_id)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        engine.dispose()
    output = log_path.read_text()
    assert code == 0, output
    assert record.outcome == "completed"
    assert results["a"] == 3
    assert results["b"] == 13
    assert results["c"]["deps"] == ["b"]
    assert "Using an in-process stream" in output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [e["failed"] for e in events if e["event"] == "process.stopped"] == [[]]
    assert [e["handed_off"] for e in events if e["event"] == "worker.stopped"] == [handed_off]


# -- help --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["demo"], ["migrate"], ["explain"], ["status"]])
def test_help_shows_an_example(tmp_path: Path, command: list[str]) -> None:
    run = streamflow(tmp_path, *command, "--help")
    assert run.code == 0, run.err
    assert "Example:" in run.out
    assert f"streamflow {command[0] if command else 'demo'}" in run.out
    assert not (tmp_path / "streamflow.db").exists()


# -- mistakes end in one red line ------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migrated")
    run = streamflow(path, "migrate")
    assert run.code == 0, run.err
    return path


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["status", "no-such-workflow"], "no workflow with id 'no-such-workflow'"),
        (["explain", "no-such-workflow", "fetch"], "no workflow with id 'no-such-workflow'"),
    ],
)
def test_unknown_workflow_is_one_line(migrated_dir: Path, args: list[str], contains: str) -> None:
    assert_one_line_error(streamflow(migrated_dir, *args), code=2, contains=contains)


def test_unknown_step_lists_the_known_ones(demo_dir: Path, demo_json: dict[str, Any]) -> None:
    checkout_id = demo_json["explain"]["workflow_id"]
    run = streamflow(demo_dir, "explain", checkout_id, "nope")
    assert_one_line_error(run, code=2, contains="has no step 'nope'")
    assert "'archive_receipt'" in run.error_lines[0]


def test_reading_before_any_database_exists_says_what_to_run(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "status", "abc")
    assert_one_line_error(run, code=1, contains="streamflow migrate")
    assert "embedded default database" in run.err
    assert not (tmp_path / "streamflow.db").exists()


def test_bad_url_is_a_usage_error(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "status", "abc", "--database-url", "not a url")
    assert_one_line_error(run, code=2, contains="not a usable database URL")


@pytest.mark.parametrize("command", ["worker", "run"])
@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["--queues", " , "], "--queues needs at least one queue name"),
        (["--concurrency", "8", "--in-flight", "4"], "must be at least --concurrency"),
    ],
)
def test_bad_engine_options_are_one_line_usage_errors(
    tmp_path: Path, command: str, args: list[str], contains: str
) -> None:
    run = streamflow(tmp_path, command, *args)
    assert_one_line_error(run, code=2, contains=contains)
    assert not (tmp_path / "streamflow.db").exists(), "wrote before refusing"


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:1/nothing"
    run = streamflow(tmp_path, "explain", "abc", "step", "--database-url", url)
    assert_one_line_error(run, code=1, contains="cannot use the database")
    assert "secret" not in run.err


def test_unmigrated_database_says_run_migrate(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    run = streamflow(tmp_path, "demo", "--database-url", url)
    assert_one_line_error(run, code=1, contains="streamflow migrate")


# -- migrate -----------------------------------------------------------------------------


def test_migrate_a_fresh_sqlite_database_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = streamflow(tmp_path, "migrate", "--database-url", url)
    assert first.code == 0, first.err
    assert "migrated from an empty database to" in first.out
    assert first.err == ""  # an explicit URL: no embedded-default notice

    again = streamflow(tmp_path, "migrate", env={"STREAMFLOW_DATABASE_URL": url})
    assert again.code == 0, again.err
    assert "already at revision" in again.out and "nothing to do" in again.out
    assert again.err == ""


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture
def pg_workflow(postgres_url: str) -> Iterator[str]:
    """A workflow inserted with the library: a fails, b is cancelled, c waits on a join."""
    engine = make_engine(postgres_url)
    wf = (
        Workflow.new("cli_pg", {"k": 1})
        .add("a", Noop.new())
        .add("b", Noop.new(), deps=["a"])
        .add("c", Noop.new(), deps=[Dep("a", policy="continue"), "b2"])
        .add("b2", Noop.new())
    )
    persisted = Workflow.insert(wf, engine)
    Workflow.complete_step(engine, persisted.id, "a", status="failed", payload={"e": 1})
    engine.dispose()
    yield persisted.id


@pytest.mark.postgres
def test_explain_and_status_json_on_postgres(
    tmp_path: Path, postgres_url: str, pg_workflow: str
) -> None:
    explain = streamflow(
        tmp_path, "explain", pg_workflow, "c", "--json", "--database-url", postgres_url
    )
    assert explain.code == 0, explain.err
    assert explain.err == ""
    engine = make_engine(postgres_url)
    try:
        expected = Explain.workflow_step(pg_workflow, "c", repo=engine).to_dict()
    finally:
        engine.dispose()
    assert explain.json() == json.loads(json.dumps(expected, default=str))
    assert explain.json()["label"] == "Waiting"
    assert {d["step"]: d["satisfied"] for d in explain.json()["dependencies"]} == {
        "a": True,
        "b2": False,
    }

    b = streamflow(tmp_path, "explain", pg_workflow, "b", "--json", "--database-url", postgres_url)
    assert b.json()["blocker_codes"] == ["cancelled_by_dependency"]
    assert b.json()["cancelled_by_step"] == "a"

    status = streamflow(
        tmp_path, "status", pg_workflow, "--json", env={"STREAMFLOW_DATABASE_URL": postgres_url}
    )
    assert status.code == 0, status.err
    assert status.err == ""
    data = status.json()
    assert data["workflow"]["name"] == "cli_pg"
    assert data["workflow"]["state"] == "running"
    assert data["workflow"]["counters"] == {
        "pending": 1,
        "runnable": 1,
        "executing": 0,
        "retryable": 0,
        "completed": 0,
        "failed": 1,
        "cancelled": 1,
    }
    labels = {s["name"]: s["label"] for s in data["steps"]}
    assert labels == {"a": "Needs Review", "b": "Cancelled", "c": "Waiting", "b2": "Runnable"}
    assert not (tmp_path / "streamflow.db").exists()


@pytest.mark.postgres
def test_migrate_and_demo_on_a_migrated_postgres(tmp_path: Path, postgres_url: str) -> None:
    migrate = streamflow(tmp_path, "migrate", "--database-url", postgres_url)
    assert migrate.code == 0, migrate.err
    assert "already at revision" in migrate.out

    demo = streamflow(tmp_path, "demo", "--json", "--database-url", postgres_url)
    assert demo.code == 0, demo.err
    data = demo.json()
    assert data["database"]["embedded"] is False
    assert data["streams"] == "an in-process stream (fakeredis)"
    assert [w["outcome"] for w in data["workflows"]] == [
        "completed",
        "completed",
        "failed",
        "completed",
        "completed",
    ]
    assert not (tmp_path / "streamflow.db").exists()
