"""The `streamflow` command, run for real in a subprocess, in a scratch directory.

Each run gets an environment with every STREAMFLOW_* variable removed, so the embedded
default (`sqlite:///./streamflow.db` in the working directory) is what a newcomer gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger.db import make_engine
from streamflow import Dep, Explain, Workflow
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


def test_demo_creates_the_embedded_database_and_says_so(demo_dir: Path, demo_text: Run) -> None:
    assert demo_text.code == 0, demo_text.err
    assert (demo_dir / "streamflow.db").exists()
    assert "embedded default database sqlite:///./streamflow.db" in demo_text.err
    assert "STREAMFLOW_DATABASE_URL" in demo_text.err
    assert "--database-url" in demo_text.err
    assert "Traceback" not in demo_text.err


def test_demo_prints_each_scenario_with_its_states(demo_text: Run) -> None:
    out = demo_text.out
    assert "No engine runs workers yet" in out
    # 1. customer sync, step by step
    assert "fetch_customer reported completed -> applied; released sync_billing" in out
    assert "sync_billing reported completed -> applied; released cleanup" in out
    assert '"$streamflow.result": "fetch_customer"' in out
    assert '"customer": {"customer_id": 1, "email": "ada@example.com"}' in out
    assert "workflow sync_customer: finished, outcome completed" in out
    # 2. fan-out / fan-in
    assert "released summarize_eu, summarize_us, summarize_apac" in out
    assert "released merge_reports" in out
    assert "[joins 3: summarize_eu, summarize_us, summarize_apac]" in out
    assert "workflow regional_report: finished, outcome completed" in out
    # 3. the failure cascade
    assert "cancelled send_receipt, archive_receipt" in out
    assert "released release_hold" in out
    assert "archive_receipt cancelled by: send_receipt (root cause: charge_card)" in out
    assert "workflow checkout: finished, outcome failed" in out
    # 4. evidence
    assert "duplicate" in out
    assert "conflicts_with_recorded_outcome" in out
    assert "workflow send_invoice: finished, outcome completed  (needs review)" in out
    # 5./6. the explain report, label first
    assert "workflow price_update: running" in out
    assert out.index("WAITING") < out.index("waiting_on_retryable_dependency")
    assert "streamflow explain " in out


def test_demo_json_records_what_the_ledger_did(demo_json: dict[str, Any]) -> None:
    assert demo_json["database"] == {"url": "sqlite:///./streamflow.db", "embedded": True}
    scenarios = {s["key"]: s for s in demo_json["scenarios"]}
    assert {k: s["outcome"] for k, s in scenarios.items()} == {
        "customer_sync": "completed",
        "fan_out": "completed",
        "failure": "failed",
        "evidence": "completed",
        "retry": None,
    }

    sync = scenarios["customer_sync"]
    states = [{v["name"]: v["state"] for v in snap["steps"]} for snap in sync["timeline"]]
    assert states == [
        {"fetch_customer": "available", "sync_billing": "pending", "cleanup": "pending"},
        {"fetch_customer": "completed", "sync_billing": "available", "cleanup": "pending"},
        {"fetch_customer": "completed", "sync_billing": "completed", "cleanup": "available"},
        {"fetch_customer": "completed", "sync_billing": "completed", "cleanup": "completed"},
    ]
    assert sync["results"]["fetch_customer"] == {"customer_id": 1, "email": "ada@example.com"}
    assert {"parent": "sync_billing", "child": "cleanup", "policy": "continue"} in sync["edges"]

    fan = scenarios["fan_out"]
    released = [(r["after"]["step"], r["after"]["released"]) for r in fan["timeline"][1:]]
    assert released == [
        ("load_orders", ["summarize_eu", "summarize_us", "summarize_apac"]),
        ("summarize_eu", []),
        ("summarize_us", []),
        ("summarize_apac", ["merge_reports"]),
        ("merge_reports", []),
    ]

    failure = scenarios["failure"]
    first = failure["timeline"][1]["after"]
    assert first["cancelled"] == ["send_receipt", "archive_receipt"]
    assert first["released"] == ["release_hold"]
    final = {v["name"]: v for v in failure["timeline"][-1]["steps"]}
    assert final["archive_receipt"]["cancelled_by_step"] == "send_receipt"
    assert final["archive_receipt"]["cancel_root_step"] == "charge_card"
    assert final["release_hold"]["state"] == "completed"
    assert final["charge_card"]["label"] == "Needs Review"

    evidence = scenarios["evidence"]
    kinds = [snap["after"]["classification"] for snap in evidence["timeline"][1:]]
    assert kinds == ["applied", "duplicate", "ambiguous", "applied"]
    assert evidence["results"]["issue_invoice"] == {"invoice_id": "inv_2002"}

    explain = demo_json["explain"]
    assert explain["step"] == "convert_prices"
    assert explain["label"] == "Waiting"
    assert explain["state"] == "pending"
    assert explain["blocker_codes"] == ["waiting_on_retryable_dependency"]
    assert explain["dependencies"][0]["state"] == "retryable"


def test_status_and_explain_on_what_the_demo_left(
    demo_dir: Path, demo_json: dict[str, Any]
) -> None:
    scenarios = {s["key"]: s for s in demo_json["scenarios"]}
    fan_id = scenarios["fan_out"]["workflow_id"]

    status = streamflow(demo_dir, "status", fan_id, "--json")
    assert status.code == 0, status.err
    data = status.json()
    assert data["workflow"]["outcome"] == "completed"
    assert data["workflow"]["counters"]["completed"] == 5
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["load_orders"]["children"] == ["summarize_eu", "summarize_us", "summarize_apac"]
    assert [d["step"] for d in steps["merge_reports"]["deps"]] == [
        "summarize_eu",
        "summarize_us",
        "summarize_apac",
    ]
    assert {s["label"] for s in data["steps"]} == {"Done"}

    tree = streamflow(demo_dir, "status", fan_id)
    assert tree.code == 0, tree.err
    # The fan-in step appears under each of its three parents, marked.
    assert tree.out.count("merge_reports") == 3
    assert tree.out.count("[joins 3: summarize_eu, summarize_us, summarize_apac]") == 3

    retry_id = scenarios["retry"]["workflow_id"]
    explain = streamflow(demo_dir, "explain", retry_id, "convert_prices")
    assert explain.code == 0, explain.err
    label_at = explain.out.index("WAITING")
    assert label_at < explain.out.index("waiting for the retry of 'fetch_rates'")
    assert label_at < explain.out.index("waiting_on_retryable_dependency")
    assert "fetch_rates" in explain.out and "retryable" in explain.out


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
    assert_one_line_error(streamflow(migrated_dir, *args), code=1, contains=contains)


def test_unknown_step_lists_the_known_ones(demo_dir: Path, demo_json: dict[str, Any]) -> None:
    retry_id = demo_json["explain"]["workflow_id"]
    run = streamflow(demo_dir, "explain", retry_id, "nope")
    assert_one_line_error(run, code=1, contains="has no step 'nope'")
    assert "'convert_prices'" in run.error_lines[0]


def test_reading_before_any_database_exists_says_what_to_run(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "status", "abc")
    assert_one_line_error(run, code=1, contains="streamflow migrate")
    assert "embedded default database" in run.err
    assert not (tmp_path / "streamflow.db").exists()


def test_bad_url_is_a_usage_error(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "status", "abc", "--database-url", "not a url")
    assert_one_line_error(run, code=2, contains="not a usable database URL")


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
    assert [s["outcome"] for s in data["scenarios"]] == [
        "completed",
        "completed",
        "failed",
        "completed",
        None,
    ]
