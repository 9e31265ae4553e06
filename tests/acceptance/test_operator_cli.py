"""The operator commands — `workflows`, `evidence`, `retry`, `replay` — run for real in
subprocesses: bad input on a SQLite file, the retry path on PostgreSQL, and a replay
through real Redis that a running `streamflow consume` classifies as a duplicate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from ledger import tables as t
from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Dep, Workflow
from streamflow.cli import app
from streamflow.streams.keys import StreamKeys
from tests.integration.processes import ROOT, Proc, base_env, wait_for
from tests.ledger.helpers import recount
from tests.workers import Noop

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def streamflow(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), clean.get("PYTHONPATH")) if p)
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
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: ")
    assert contains in lines[0], lines[0]


def checkout(name: str) -> Workflow:
    return (
        Workflow.new(name)
        .add("charge", Noop.new(max_attempts=1))
        .add("receipt", Noop.new(), deps=["charge"])
        .add("archive", Noop.new(), deps=["receipt"])
        .add("release_hold", Noop.new(), deps=[Dep("charge", policy="continue")])
    )


# -- help ---------------------------------------------------------------------------------------

COMMANDS = ["workflows", "evidence", "retry", "replay"]


def in_process(*args: str) -> Run:
    """The same app without a new interpreter, for the many small cases; the subprocess
    tests below show the real command behaves the same."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Run(result.exit_code, result.stdout, result.stderr)


def test_the_commands_are_registered_on_the_real_entry_point(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "--help")
    assert run.code == 0, run.err
    for command in COMMANDS:
        assert f"│ {command} " in run.out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(tmp_path: Path, command: str) -> None:
    run = in_process(command, "--help")
    assert run.code == 0, run.err
    assert "Example:" in run.out
    assert f"streamflow {command} " in run.out
    assert "--json" in run.out


# -- bad input: one line, exit code 2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A migrated SQLite file with one running workflow: (directory, url, workflow id)."""
    path = tmp_path_factory.mktemp("operator") / "ledger.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade(engine)
    wid = Workflow.insert(checkout("sqlite_checkout"), engine).id
    engine.dispose()
    return path.parent, url, wid


BAD_INPUT = [
    (["workflows", "--state", "done"], "--state must be one of running, finished"),
    (["workflows", "--outcome", "ok"], "--outcome must be one of completed, failed"),
    (["workflows", "--older-than", "5 parsecs"], "--older-than must be a duration"),
    (["workflows", "--newer-than", "0s"], "--newer-than must be longer than zero"),
    (["workflows", "--limit", "ten"], "--limit must be a whole number from 1 to 1000"),
    (["workflows", "--state", "running", "--outcome", "failed"], "has no outcome yet"),
    (["evidence", "nope"], "no workflow with id 'nope'"),
    (["evidence", "{wid}", "--limit", "-1"], "--limit must be a whole number"),
    (["retry", "nope", "charge"], "no workflow with id 'nope'"),
    (["retry", "{wid}", "nope"], "has no step 'nope' (its steps: 'charge'"),
    (["retry", "{wid}", "charge"], "'charge' is available, not failed"),
    (["retry", "{wid}", "receipt"], "'receipt' is pending, not failed"),
    (["replay", "{wid}", "charge"], "needs Redis: pass --redis-url"),
    (["replay", "{wid}", "charge", "--attempt", "x"], "--attempt must be a whole number"),
]


@pytest.mark.parametrize(("args", "contains"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(
    sqlite_ledger: tuple[Path, str, str], args: list[str], contains: str
) -> None:
    _, url, wid = sqlite_ledger
    run = in_process(*[a.replace("{wid}", wid) for a in args], "--database-url", url)
    assert_one_line_error(run, code=2, contains=contains)


@pytest.mark.parametrize(
    ("args", "contains"), [BAD_INPUT[0], BAD_INPUT[2], BAD_INPUT[6], BAD_INPUT[10]]
)
def test_bad_input_through_the_real_command(
    sqlite_ledger: tuple[Path, str, str], args: list[str], contains: str
) -> None:
    cwd, url, wid = sqlite_ledger
    run = streamflow(cwd, *[a.replace("{wid}", wid) for a in args], "--database-url", url)
    assert_one_line_error(run, code=2, contains=contains)


def test_trouble_with_the_database_stays_exit_code_1(tmp_path: Path) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:1/nothing"
    run = streamflow(tmp_path, "workflows", "--database-url", url)
    assert_one_line_error(run, code=1, contains="cannot use the database")
    assert "secret" not in run.err


# -- PostgreSQL: list, retry, evidence -----------------------------------------------------------


@pytest.mark.postgres
def test_list_retry_and_evidence_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    name = f"op_{uuid.uuid4().hex[:8]}"
    engine = make_engine(postgres_url)
    try:
        wid = Workflow.insert(checkout(name), engine).id
        Workflow.complete_step(engine, wid, "charge", status="failed", payload={"e": "declined"})
        Workflow.complete_step(engine, wid, "release_hold", status="completed")
        other = Workflow.insert(checkout(name), engine).id
        env = {"STREAMFLOW_DATABASE_URL": postgres_url}

        listed = streamflow(tmp_path, "workflows", "--name", name, "--json", env=env)
        assert listed.code == 0, listed.err
        assert listed.err == ""
        rows = {w["id"]: w for w in listed.json()["workflows"]}
        assert list(rows) == [other, wid]  # newest first
        failed = rows[wid]
        assert (failed["state"], failed["outcome"]) == ("finished", "failed")
        assert failed["labels"] == {"Needs Review": 1, "Cancelled": 2, "Done": 1}
        assert failed["counters"]["cancelled"] == 2
        assert rows[other]["labels"] == {"Waiting": 3, "Runnable": 1}

        table = streamflow(tmp_path, "workflows", "--name", name, "--outcome", "failed", env=env)
        assert table.code == 0, table.err
        assert "1 Needs Review · 2 Cancelled · 1 Done" in table.out
        assert "│ failed │" in table.out  # a finished workflow shows its outcome
        assert other not in table.out
        assert "1 workflow, newest first" in table.out

        retried = streamflow(
            tmp_path, "retry", wid, "charge", "--reason", "card updated", "--json", env=env
        )
        assert retried.code == 0, retried.err
        assert retried.json() == {
            "workflow_id": wid,
            "step": "charge",
            "state": "available",
            "failed_attempt": 1,
            "next_attempt": 2,
            "max_attempts_before": 1,
            "max_attempts": 2,
            "restored": ["receipt", "archive"],
            "recancelled": [],
            "workflow_reopened": True,
        }
        record = Workflow.get(engine, wid)
        assert (record.state, record.outcome) == ("running", None)
        assert record.counters.as_dict() == recount(engine, wid)
        with engine.connect() as conn:
            dispatched = conn.execute(
                select(t.steps.c.dispatched_at).where(
                    t.steps.c.workflow_id == wid, t.steps.c.name == "charge"
                )
            ).scalar()
        assert dispatched is None  # left for the dispatcher

        running = streamflow(
            tmp_path,
            "workflows",
            *("--name", name, "--state", "running", "--newer-than", "1h", "--json"),
            env=env,
        )
        assert [w["id"] for w in running.json()["workflows"]] == [other, wid]
        assert running.json()["workflows"][1]["labels"] == {
            "Waiting": 2,
            "Runnable": 1,
            "Done": 1,
        }
        old = streamflow(tmp_path, "workflows", "--name", name, "--older-than", "1h", env=env)
        assert (old.code, old.out.strip()) == (0, "no workflows match")

        again = streamflow(tmp_path, "retry", wid, "charge", env=env)
        assert_one_line_error(again, code=2, contains="'charge' is available, not failed")

        evidence = streamflow(tmp_path, "evidence", wid, "--json", env=env)
        assert evidence.code == 0, evidence.err
        data = evidence.json()
        assert data["workflow"]["state"] == "running"
        kinds = [(e["kind"], e["classification"], e["step"]) for e in data["entries"]]
        assert kinds == [
            ("workflow", "inserted", None),
            ("attempt", "applied", "charge"),
            ("attempt", "applied", "release_hold"),
            ("operator", "retried", "charge"),
        ]
        retry_row = data["entries"][-1]
        assert retry_row["source"] == "cli"
        assert retry_row["detail"]["payload"]["reason"] == "card updated"
        whens = [e["when"] for e in data["entries"]]
        assert whens == sorted(whens)

        text = streamflow(tmp_path, "evidence", wid, env=env)
        assert text.code == 0, text.err
        assert "retried" in text.out and "'card updated'" in text.out
        assert "max attempts 1 -> 2" in text.out
        assert "restored receipt, archive" in text.out
    finally:
        engine.dispose()
    assert not (tmp_path / "streamflow.db").exists()


# -- replay through real Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> str:
    url = os.environ.get("STREAMFLOW_TEST_REDIS_URL", DEFAULT_REDIS)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"Redis not reachable at {url}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url


@dataclass
class Streams:
    env: dict[str, str]
    keys: StreamKeys


@pytest.fixture
def streams(postgres_url: str, redis_url: str) -> Iterator[Streams]:
    """A key prefix of this test's own on the shared Redis, deleted afterwards."""
    keys = StreamKeys(prefix=f"sfop{uuid.uuid4().hex[:8]}")
    env = {
        "STREAMFLOW_DATABASE_URL": postgres_url,
        "STREAMFLOW_REDIS_URL": redis_url,
        "STREAMFLOW_STREAM_PREFIX": keys.prefix,
    }
    yield Streams(env, keys)
    client = redis.Redis.from_url(redis_url)
    try:
        found = list(client.scan_iter(match=keys.pattern, count=1000))
        if found:
            client.delete(*found)
    finally:
        client.close()


def event_rows(engine: Engine, wid: str) -> list[tuple[str, str | None, str | None]]:
    e = t.evidence
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.c.classification, e.c.step, e.c.dedupe_key)
            .where(e.c.workflow_id == wid, e.c.kind == "event")
            .order_by(e.c.id)
        ).all()
    return [(r.classification, r.step, r.dedupe_key) for r in rows]


def ledger_snapshot(engine: Engine, wid: str) -> Any:
    record = Workflow.get(engine, wid)
    steps = {n: (s.state.value, s.attempt, s.needs_review) for n, s in record.steps.items()}
    with engine.connect() as conn:
        attempts = conn.execute(
            select(t.attempts.c.step, t.attempts.c.attempt, t.attempts.c.status).where(
                t.attempts.c.workflow_id == wid
            )
        ).all()
    return (
        record.state,
        record.outcome,
        record.needs_review,
        record.counters,
        steps,
        Workflow.results(engine, wid),
        sorted(tuple(a) for a in attempts),
    )


@pytest.mark.postgres
def test_a_replayed_event_is_classified_duplicate_and_changes_nothing(
    tmp_path: Path, postgres_url: str, streams: Streams
) -> None:
    engine = make_engine(postgres_url)
    consumer = Proc(
        ["consume", "--reconcile-every", "60"], base_env(**streams.env), tmp_path, "consumer"
    )
    try:
        wf = Workflow.new(f"replay_{uuid.uuid4().hex[:6]}").add("a", Noop.new())
        wf = wf.add("b", Noop.new(), deps=["a"])
        wid = Workflow.insert(wf, engine).id
        done = streamflow(tmp_path, "complete", wid, "a", "--payload", '{"n": 1}', env=streams.env)
        assert done.code == 0, done.err
        key = f"{wid}:a:1:completed"
        wait_for(
            lambda: ("consumed", "a", key) in event_rows(engine, wid),
            20,
            "the consumer to consume a's completion event",
            on_timeout=consumer.output,
        )
        before = ledger_snapshot(engine, wid)

        replay = streamflow(tmp_path, "replay", wid, "a", "--json", env=streams.env)
        assert replay.code == 0, replay.err
        assert replay.json() == {
            "workflow_id": wid,
            "step": "a",
            "attempt": 1,
            "status": "completed",
            "idempotency_key": key,
            "stream": streams.keys.completions,
            "published": True,
        }
        wait_for(
            lambda: ("duplicate", "a", key) in event_rows(engine, wid),
            20,
            "the consumer to classify the replayed delivery",
            on_timeout=consumer.output,
        )
        assert event_rows(engine, wid) == [("consumed", "a", key), ("duplicate", "a", key)]
        assert ledger_snapshot(engine, wid) == before

        evidence = streamflow(tmp_path, "evidence", wid, "--json", env=streams.env)
        assert evidence.code == 0, evidence.err
        trail = [
            (e["kind"], e["classification"], e["step"])
            for e in evidence.json()["entries"]
            if e["kind"] in ("event", "operator")
        ]
        assert trail == [
            ("event", "consumed", "a"),
            ("operator", "replayed", "a"),
            ("event", "duplicate", "a"),
        ]

        # What cannot be replayed is the caller's mistake: one line, exit code 2.
        nothing = streamflow(tmp_path, "replay", wid, "b", env=streams.env)
        assert_one_line_error(nothing, code=2, contains="'b' has no recorded outcome")
        wrong = streamflow(tmp_path, "replay", wid, "a", "--attempt", "2", env=streams.env)
        assert_one_line_error(wrong, code=2, contains="no recorded outcome for attempt 2")
        assert consumer.running, consumer.output()
    finally:
        consumer.kill()
        engine.dispose()
