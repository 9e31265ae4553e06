"""`streamflow dashboard` for real: a subprocess serving a SQLite ledger over HTTP, its
token rule, and one-line errors for what cannot start."""

from __future__ import annotations

import re
import signal
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Workflow
from tests.acceptance.test_cli import Run, assert_one_line_error, streamflow
from tests.integration.processes import Proc, base_env, wait_for
from tests.workers import Noop

STARTED = re.compile(r"Streamflow dashboard on (http://127\.0\.0\.1:\d+/)")


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[str, str]:
    """A migrated SQLite ledger with one running workflow: (url, workflow id)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        wid = Workflow.insert(Workflow.new("nightly_export").add("dump", Noop.new()), engine).id
    finally:
        engine.dispose()
    return url, wid


@contextmanager
def serve(tmp_path: Path, url: str, **env: str) -> Iterator[tuple[Proc, str]]:
    proc = Proc(
        ["dashboard", "--port", "0", "--database-url", url],
        base_env(**env),
        tmp_path,
        "dashboard",
    )
    try:
        found = wait_for(
            lambda: STARTED.search(proc.output()) or (None if proc.running else proc.output()),
            timeout=30,
            what="the dashboard to say where it listens",
            on_timeout=proc.output,
        )
        assert isinstance(found, re.Match), found
        yield proc, found.group(1)
    finally:
        # uvicorn finishes in-flight requests, then lets SIGTERM end the process as usual.
        code = proc.terminate(timeout=15)
        assert code in (0, -signal.SIGTERM), proc.output()
        assert "Traceback" not in proc.output()


def post(url: str, fields: dict[str, str]) -> int:
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_it_serves_the_ledger_and_stops_cleanly(tmp_path: Path, ledger: tuple[str, str]) -> None:
    url, wid = ledger
    with serve(tmp_path, url) as (proc, base):
        with urllib.request.urlopen(base, timeout=10) as r:
            page = r.read().decode()
        assert r.status == 200 and "nightly_export" in page and wid in page
        with urllib.request.urlopen(f"{base}workflows/{wid}", timeout=10) as r:
            assert 'data-step="dump"' in r.read().decode()
        # On loopback with no token, actions need none.
        assert "token" not in proc.output()
        assert post(f"{base}workflows/{wid}/cancel", {"reason": "not tonight"}) == 200
    engine = make_engine(url)
    try:
        assert Workflow.get(engine, wid).outcome == "cancelled"
    finally:
        engine.dispose()


def test_a_token_from_the_environment_guards_the_actions(
    tmp_path: Path, ledger: tuple[str, str]
) -> None:
    url, wid = ledger
    with serve(tmp_path, url, STREAMFLOW_DASHBOARD_TOKEN="let-me-in") as (proc, base):
        assert "Actions need the token" in proc.output()
        assert "let-me-in" not in proc.output()  # a token you chose is not echoed
        assert post(f"{base}workflows/{wid}/cancel", {}) == 403
        assert post(f"{base}workflows/{wid}/cancel", {"token": "let-me-out"}) == 403
        assert post(f"{base}workflows/{wid}/cancel", {"token": "let-me-in"}) == 200


def test_what_cannot_start_is_one_line(tmp_path: Path, ledger: tuple[str, str]) -> None:
    url, _ = ledger
    run: Run = streamflow(tmp_path, "dashboard", "--port", "70000", "--database-url", url)
    assert run.code == 2 and "Traceback" not in run.err
    missing = streamflow(tmp_path, "dashboard", "--database-url", f"sqlite:///{tmp_path}/no.db")
    assert_one_line_error(missing, code=1, contains="no database file")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = streamflow(tmp_path, "dashboard", "--port", port, "--database-url", url)
    assert_one_line_error(busy, code=1, contains=f"cannot listen on 127.0.0.1:{port}")


def test_without_the_extra_it_says_what_to_install(tmp_path: Path, ledger: tuple[str, str]) -> None:
    url, _ = ledger
    fake = tmp_path / "no_extra"
    fake.mkdir()
    (fake / "uvicorn.py").write_text(
        'raise ModuleNotFoundError("No module named \'uvicorn\'", name="uvicorn")\n'
    )
    run = streamflow(tmp_path, "dashboard", "--database-url", url, env={"PYTHONPATH": str(fake)})
    assert_one_line_error(run, code=2, contains="pip install 'streamflow[dashboard]'")


def test_help_shows_an_example_and_the_token_rule(tmp_path: Path) -> None:
    run = streamflow(tmp_path, "dashboard", "--help")
    assert run.code == 0, run.err
    assert "Example:" in run.out and "streamflow dashboard --port 8080" in run.out
    assert "STREAMFLOW_DASHBOARD_TOKEN" in run.out and "127.0.0.1" in run.out
    assert not (tmp_path / "streamflow.db").exists()
