"""`streamflow prune` for real, in a subprocess: help, bad input, a dry run, an archived
prune with progress on stderr — on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from ledger import tables as t
from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Workflow
from tests.integration.processes import ROOT
from tests.workers import Noop


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def streamflow(cwd: Path, *args: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({"COLUMNS": "200", "NO_COLOR": "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "streamflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def ledger_with_history(engine: Engine) -> dict[str, str]:
    """Three workflows: finished 40 days ago, finished 5 days ago, still running."""
    ids = {}
    for label in ("old", "young", "running"):
        wf = Workflow.new(name=label).add("a", Noop.new({})).add("b", Noop.new({}), deps=["a"])
        wid = Workflow.insert(wf, engine).id
        steps = ["a"] if label == "running" else ["a", "b"]
        for step in steps:
            Workflow.complete_step(engine, wid, step, status="completed")
        ids[label] = wid
    with engine.begin() as conn:
        for label, days in (("old", 40), ("young", 5)):
            conn.execute(
                update(t.workflows)
                .where(t.workflows.c.id == ids[label])
                .values(finished_at=datetime.now(UTC) - timedelta(days=days))
            )
    return ids


def remaining(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(t.workflows.c.id)).scalars())


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> tuple[str, Engine]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    upgrade(engine)
    return url, engine


def test_help_shows_an_example(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "prune", "--help")
    assert run.code == 0
    assert "Example:" in run.out and "--older-than 30d" in run.out
    assert "--archive-to" in run.out and "--dry-run" in run.out


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["--older-than", "3x"], "--older-than must be a duration"),
        (["--older-than", "0d"], "--older-than must be longer than zero"),
        (["--older-than", "30d", "--batch-size", "many"], "--batch-size must be a whole number"),
        (["--older-than", "30d", "--batch-size", "0"], "--batch-size must be a whole number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, sqlite_ledger: tuple[str, Engine], args: list[str], contains: str
) -> None:
    url, _ = sqlite_ledger
    run = streamflow(tmp_path, "prune", *args, "--database-url", url)
    assert run.code == 2, (run.out, run.err)
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    assert contains in lines[0]
    assert "Traceback" not in run.err


def test_an_unwritable_archive_is_refused_before_anything_goes(
    tmp_path: Path, sqlite_ledger: tuple[str, Engine]
) -> None:
    url, engine = sqlite_ledger
    ids = ledger_with_history(engine)
    archive = tmp_path / "no" / "such" / "dir.jsonl"
    run = streamflow(
        tmp_path,
        "prune",
        "--older-than",
        "30d",
        "--archive-to",
        str(archive),
        "--database-url",
        url,
    )
    assert run.code == 2, (run.out, run.err)
    assert "cannot write the archive" in run.err
    assert remaining(engine) == set(ids.values())


def _dry_run_then_prune(tmp_path: Path, url: str, engine: Engine) -> None:
    ids = ledger_with_history(engine)
    dry = streamflow(
        tmp_path, "prune", "--older-than", "30d", "--dry-run", "--json", "--database-url", url
    )
    assert dry.code == 0, dry.err
    counted = dry.json()
    assert counted["dry_run"] is True
    assert counted["workflows"] == 1
    assert counted["rows"]["streamflow_steps"] == 2
    assert remaining(engine) == set(ids.values())

    archive = tmp_path / "archive.jsonl"
    run = streamflow(
        tmp_path,
        "prune",
        "--older-than",
        "30d",
        "--batch-size",
        "1",
        "--archive-to",
        str(archive),
        "--json",
        "--database-url",
        url,
    )
    assert run.code == 0, run.err
    done = run.json()
    assert done["workflows"] == 1 and done["archived"] == 1
    assert done["rows"] == counted["rows"]
    assert "pruned 1 workflows (2 steps)" in run.err  # progress goes to stderr
    (line,) = archive.read_text().splitlines()
    record = json.loads(line)
    assert record["workflow_id"] == ids["old"]
    assert {s["name"] for s in record["steps"]} == {"a", "b"}
    assert remaining(engine) == {ids["young"], ids["running"]}

    again = streamflow(tmp_path, "prune", "--older-than", "30d", "--database-url", url)
    assert again.code == 0, again.err
    assert "pruned 0 workflows" in again.out
    assert "streamflow_steps" in again.out  # the table of rows per table


def test_dry_run_then_archive_and_prune_on_sqlite(
    tmp_path: Path, sqlite_ledger: tuple[str, Engine]
) -> None:
    url, engine = sqlite_ledger
    _dry_run_then_prune(tmp_path, url, engine)
    engine.dispose()


@pytest.mark.postgres
def test_dry_run_then_archive_and_prune_on_postgres(
    tmp_path: Path, postgres_url: str, pg_engine: Engine
) -> None:
    _dry_run_then_prune(tmp_path, postgres_url, pg_engine)
