"""Two (or more) parents of a fan-in finishing at the same moment, in separate
transactions on real PostgreSQL connections under the default isolation (READ
COMMITTED): the child must be released exactly once, every time.

Without the workflow-row lock the classic failure is the lost chord: each transaction
sees the other parent still unfinished, neither releases, and the join waits forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine

from ledger.model import CompletionResult
from streamflow import Dep, Workflow
from tests.ledger.helpers import recount
from tests.workers import Noop

pytestmark = pytest.mark.postgres


def fan_in(width: int, policy: str = "cancel") -> Workflow:
    wf = Workflow.new("fan_in").add("root", Noop.new())
    for i in range(width):
        wf = wf.add(f"p{i}", Noop.new(), deps=["root"])
    return wf.add("join", Noop.new(), deps=[Dep(f"p{i}", policy) for i in range(width)])


def race(engine: Engine, calls: list[Callable[[], CompletionResult]]) -> list[CompletionResult]:
    """Run the calls at the same instant, one thread and one connection each."""
    barrier = threading.Barrier(len(calls), timeout=10)

    def run(call: Callable[[], CompletionResult]) -> CompletionResult:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, c) for c in calls]
        return [f.result(timeout=30) for f in futures]


def completer(
    engine: Engine, wid: str, step: str, status: str = "completed", payload: Any = None
) -> Callable[[], CompletionResult]:
    return lambda: Workflow.complete_step(engine, wid, step, status=status, payload=payload)


def test_two_parents_release_the_join_exactly_once(pg_engine: Engine) -> None:
    assert pg_engine.dialect.name == "postgresql"
    for i in range(300):
        wid = Workflow.insert(fan_in(2), pg_engine).id
        Workflow.complete_step(pg_engine, wid, "root", status="completed")
        results = race(
            pg_engine,
            [
                completer(pg_engine, wid, "p0", payload=i),
                completer(pg_engine, wid, "p1", payload=-i),
            ],
        )
        released = [s for r in results for s in r.released]
        assert released == ["join"], f"iteration {i}: released {released}"
        wf = Workflow.get(pg_engine, wid)
        assert wf.steps["join"].state.value == "available"
        assert wf.counters.as_dict() == recount(pg_engine, wid)


def test_eight_parents_release_the_join_exactly_once(pg_engine: Engine) -> None:
    for _ in range(40):
        wid = Workflow.insert(fan_in(8), pg_engine).id
        Workflow.complete_step(pg_engine, wid, "root", status="completed")
        results = race(pg_engine, [completer(pg_engine, wid, f"p{i}") for i in range(8)])
        assert [s for r in results for s in r.released] == ["join"]
        assert Workflow.get(pg_engine, wid).counters.as_dict() == recount(pg_engine, wid)


def test_racing_failure_and_completion_cancel_the_join_exactly_once(pg_engine: Engine) -> None:
    for _ in range(100):
        wid = Workflow.insert(fan_in(2), pg_engine).id
        Workflow.complete_step(pg_engine, wid, "root", status="completed")
        results = race(
            pg_engine, [completer(pg_engine, wid, "p0", "failed"), completer(pg_engine, wid, "p1")]
        )
        assert [s for r in results for s in r.cancelled] == ["join"]
        assert [s for r in results for s in r.released] == []
        wf = Workflow.get(pg_engine, wid)
        assert wf.outcome == "failed"
        assert wf.counters.as_dict() == recount(pg_engine, wid)


def test_racing_duplicates_store_one_result(pg_engine: Engine) -> None:
    for _ in range(100):
        wid = Workflow.insert(fan_in(1), pg_engine).id
        results = race(
            pg_engine, [completer(pg_engine, wid, "root", payload={"v": 1}) for _ in range(4)]
        )
        kinds = sorted(r.classification.value for r in results)
        assert kinds == ["applied", "duplicate", "duplicate", "duplicate"]
        assert [s for r in results for s in r.released] == ["p0"]
        assert Workflow.results(pg_engine, wid) == {"root": {"v": 1}}
