"""The embedded SQLite ledger: readers never wait for a writer, writers queue."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from streamflow import Workflow
from tests.workers import Noop


def test_reads_do_not_wait_for_an_open_write(sqlite_engine: Engine) -> None:
    wid = Workflow.insert(Workflow.new("w").add("a", Noop.new()), sqlite_engine).id
    with sqlite_engine.begin() as conn:
        Workflow.complete_step(conn, wid, "a", status="completed")
        # Another connection reads the last committed state instead of blocking.
        assert Workflow.get(sqlite_engine, wid).steps["a"].state.value == "available"
    assert Workflow.get(sqlite_engine, wid).steps["a"].state.value == "completed"


def test_concurrent_writers_queue_for_the_lock(sqlite_engine: Engine) -> None:
    wf = Workflow.new("fan").add("root", Noop.new())
    for i in range(6):
        wf = wf.add(f"p{i}", Noop.new(), deps=["root"])
    wf = wf.add("join", Noop.new(), deps=[f"p{i}" for i in range(6)])
    wid = Workflow.insert(wf, sqlite_engine).id
    Workflow.complete_step(sqlite_engine, wid, "root", status="completed")
    barrier = threading.Barrier(6, timeout=10)

    def finish(step: str) -> tuple[str, ...]:
        barrier.wait()
        return Workflow.complete_step(sqlite_engine, wid, step, status="completed").released

    with ThreadPoolExecutor(6) as pool:
        released = [s for r in pool.map(finish, [f"p{i}" for i in range(6)]) for s in r]
    assert released == ["join"]
