"""Cancel, callbacks and signals through the engine, in-process: fakeredis and SQLite.

Components run as their processes run them (loops in threads with a stop event);
conditions are polled with deadlines, never slept on.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import Workflow
from streamflow.engine.maintenance import Maintenance
from streamflow.engine.worker_runtime import WorkerConfig, WorkerRuntime
from streamflow.streams import (
    MalformedEntry,
    ReadyMessage,
    RedisTransport,
    StreamKeys,
    decode_ready,
    encode,
)
from tests import engine_app as app

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def perform_log(tmp_path: Path) -> Path:
    return tmp_path / "performs.jsonl"


@contextmanager
def running(target: Callable[[threading.Event], None]) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), name="component-under-test")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the component did not stop within 15 s"


def worker_for(
    engine: Engine, transport: RedisTransport, keys: StreamKeys, **config: Any
) -> WorkerRuntime:
    settings: dict[str, Any] = {
        "queues": ("default",),
        "name": f"worker-{uuid.uuid4().hex[:6]}",
        "concurrency": 4,
        "block_ms": 20,
        "drain_seconds": 10.0,
    }
    settings.update(config)
    return WorkerRuntime(engine, transport, keys, WorkerConfig(**settings))


def log_lines(log: Path, **match: Any) -> list[dict[str, Any]]:
    return [r for r in app.perform_log(log) if all(r.get(k) == v for k, v in match.items())]


def evidence_rows(engine: Engine, workflow_id: str) -> list[Any]:
    e = t.evidence
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(e.c.step, e.c.kind, e.c.classification, e.c.reason, e.c.payload)
                .where(e.c.workflow_id == workflow_id)
                .order_by(e.c.id)
            ).all()
        )


# -- cancel ------------------------------------------------------------------------------------


def test_a_running_step_sees_the_cancel_within_one_heartbeat(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = Workflow.new("cancel_running", {"log": str(perform_log)}).add(
        "wait", app.WaitsForCancel.new({"seconds": 20})
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    lease = 0.9  # renewed (and checked) every 0.3 s
    worker = worker_for(sqlite_engine, transport, keys, lease_seconds=lease)
    with running(worker.run):
        Maintenance(sqlite_engine, transport, keys).tick()
        until(lambda: log_lines(perform_log, phase="start"), "the step to start")
        cancelled_at = time.time()
        result = Workflow.cancel(sqlite_engine, wid, reason="stop now")
        assert result.revoked == ("wait",)
        [end] = until(lambda: log_lines(perform_log, phase="end"), "the step to notice")
        late = until(
            lambda: [r for r in evidence_rows(sqlite_engine, wid) if r.kind == "completion"],
            "the worker's report to be recorded",
        )
    assert end["noticed_cancel"] is True
    # One heartbeat (lease / 3) plus scheduling slack; the step would otherwise run 20 s.
    assert end["at"] - cancelled_at < lease
    [row] = late
    assert (row.step, row.classification, row.reason) == ("wait", "late", "step_cancelled")
    assert row.payload == {"noticed_cancel": True}
    record = Workflow.get(sqlite_engine, wid)
    assert (record.outcome, record.steps["wait"].state.value) == ("cancelled", "cancelled")
    assert Workflow.results(sqlite_engine, wid) == {}
    assert worker.stats.completed == 0


# -- callbacks -----------------------------------------------------------------------------------


def test_ready_messages_carry_the_job_and_default_to_a_step() -> None:
    callback = ReadyMessage("wf1", "on_finish", "emails", at_ms=5, priority=2, job="callback")
    fields = encode(callback)
    assert fields["job"] == "callback"
    assert decode_ready(fields) == callback
    step = ReadyMessage("wf1", "a", "default", at_ms=5)
    assert "job" not in encode(step)  # unchanged on the wire for steps
    assert decode_ready(encode(step)).job == "step"
    with pytest.raises(MalformedEntry, match="unknown job"):
        decode_ready({**fields, "job": "party"})
    with pytest.raises(ValueError, match="job must be one of"):
        ReadyMessage("wf1", "a", "default", at_ms=5, job="party")


def test_the_callback_runs_once_with_the_outcome_in_its_context(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = (
        Workflow.new(
            "with_callback",
            {"log": str(perform_log)},
            on_finish=app.Notify.new({"to": "ops"}),
        )
        .add("a", app.Echo.new())
        .add("b", app.Explode.new())
        .add("c", app.Echo.new(), deps=["b"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    worker = worker_for(sqlite_engine, transport, keys)
    maintenance = Maintenance(sqlite_engine, transport, keys)
    with running(worker.run), running(maintenance.run):
        until(
            lambda: (cb := Workflow.callback(sqlite_engine, wid)) and cb.state == "completed",
            "the callback to complete",
        )
        # The dispatcher keeps polling: nothing sends or runs it again.
        time.sleep(0.3)
    [line] = log_lines(perform_log, phase="callback")
    assert line["step"] == "on_finish" and line["attempt"] == 1
    assert line["outcome"] == "failed"
    assert (line["counters"]["completed"], line["counters"]["failed"]) == (1, 1)
    assert line["counters"]["cancelled"] == 1
    assert line["results"] == ["a"]
    cb = Workflow.callback(sqlite_engine, wid)
    assert cb is not None
    assert cb.result == {"notified": "failed", "to": "ops"}
    assert [(a.attempt, a.status, a.source) for a in cb.attempts] == [(1, "completed", "worker")]
    # No completion event is published for a callback.
    completions = transport.client.xrange(keys.completions)
    assert all(dict(f)["step"] != "on_finish" for _, f in completions)  # type: ignore[union-attr]
    assert worker.stats.completed == 2  # "a" and the callback
