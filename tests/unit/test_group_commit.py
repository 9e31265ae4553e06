"""Group commit: shared transactions, private answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, String, Table, select
from sqlalchemy.exc import OperationalError

from ledger.db import make_engine
from streamflow.engine.group_commit import GroupCommitter, _Request

metadata = MetaData()
rows = Table("rows", metadata, Column("id", Integer, primary_key=True), Column("who", String))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _insert(who: str, log: list[str] | None = None) -> Callable[[Connection], str]:
    def work(conn: Connection) -> str:
        if log is not None:
            log.append(who)
        conn.execute(rows.insert().values(who=who))
        return f"done:{who}"

    return work


def _stored(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(rows.c.who)).scalars())


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


def _queued(gc: GroupCommitter) -> int:
    with gc._changed:
        return len(gc._queue)


def _hold_leader(gc: GroupCommitter, db: Engine) -> tuple[threading.Thread, threading.Event]:
    """Start a leader whose operation blocks until the returned event is set, so that the
    callers started meanwhile all queue up behind it and form the next group."""
    release = threading.Event()

    def blocking(conn: Connection) -> str:
        assert release.wait(10)
        conn.execute(rows.insert().values(who="leader"))
        return "leader"

    leader = threading.Thread(target=gc.run, args=(blocking,), kwargs={"order_key": "0"})
    leader.start()
    _wait_until(lambda: gc._leading)
    return leader, release


def _run_all(
    gc: GroupCommitter, works: dict[str, Callable[[Connection], str]]
) -> tuple[dict[str, Any], list[threading.Thread]]:
    """Call `run` for every work on its own thread; answers (or exceptions) by key."""
    answers: dict[str, Any] = {}

    def call(key: str) -> None:
        try:
            answers[key] = gc.run(works[key], order_key=key, hint=f"hint-{key}")
        except Exception as exc:
            answers[key] = exc

    threads = [threading.Thread(target=call, args=(k,)) for k in works]
    for thread in threads:
        thread.start()
    return answers, threads


def _as_one_group(
    gc: GroupCommitter, db: Engine, works: dict[str, Callable[[Connection], str]]
) -> dict[str, Any]:
    """Queue every work behind a held leader, then let them all run as one group."""
    leader, release = _hold_leader(gc, db)
    answers, threads = _run_all(gc, works)
    _wait_until(lambda: _queued(gc) == len(works))
    release.set()
    for thread in [leader, *threads]:
        thread.join(10)
    return answers


def test_a_lone_caller_commits_alone(db: Engine) -> None:
    gc = GroupCommitter(db)
    assert gc.run(_insert("a"), order_key="wf-a") == "done:a"
    assert _stored(db) == ["a"]
    assert (gc.stats.operations, gc.stats.commits) == (1, 1)


def test_callers_that_arrive_together_share_one_commit(db: Engine) -> None:
    gc = GroupCommitter(db)
    leader, release = _hold_leader(gc, db)
    names = [f"w{i:02d}" for i in range(10)]
    answers, threads = _run_all(gc, {n: _insert(n) for n in names})
    _wait_until(lambda: _queued(gc) == len(names))
    release.set()
    for thread in [leader, *threads]:
        thread.join(10)
    assert answers == {n: f"done:{n}" for n in names}
    assert _stored(db) == sorted(["leader", *names])
    # The leader's group of one, then everyone who queued behind it: two commits.
    assert (gc.stats.operations, gc.stats.commits) == (11, 2)
    assert gc.stats.largest_group == 10


def test_a_group_runs_in_order_key_order(db: Engine) -> None:
    gc = GroupCommitter(db)
    log: list[str] = []
    keys = ["wf-c", "wf-a", "wf-b"]
    _as_one_group(gc, db, {k: _insert(k, log) for k in keys})
    assert log == ["wf-a", "wf-b", "wf-c"]


def test_a_failing_operation_does_not_undo_its_neighbours(db: Engine) -> None:
    gc = GroupCommitter(db)
    leader, release = _hold_leader(gc, db)

    def bad(conn: Connection) -> str:
        conn.execute(rows.insert().values(who="bad"))
        raise LookupError("no such step")

    works = {"a": _insert("a"), "b": bad, "c": _insert("c")}
    answers, threads = _run_all(gc, works)
    _wait_until(lambda: _queued(gc) == 3)
    release.set()
    for thread in [leader, *threads]:
        thread.join(10)
    assert answers["a"] == "done:a" and answers["c"] == "done:c"
    assert isinstance(answers["b"], LookupError)
    # The failed operation's own write is rolled back; its neighbours' stand, once each.
    assert _stored(db) == ["a", "c", "leader"]
    assert gc.stats.split_groups == 1


def test_a_transient_failure_retries_the_group(db: Engine) -> None:
    gc = GroupCommitter(db)
    failures = [OperationalError("SELECT 1", {}, Exception("server closed the connection"))]

    def flaky(conn: Connection) -> str:
        conn.execute(rows.insert().values(who="flaky"))
        if failures:
            raise failures.pop()
        return "ok"

    assert gc.run(flaky, order_key="wf") == "ok"
    assert _stored(db) == ["flaky"]


def test_max_group_bounds_a_group(db: Engine) -> None:
    gc = GroupCommitter(db, max_group=3)
    leader, release = _hold_leader(gc, db)
    names = [f"w{i}" for i in range(7)]
    answers, threads = _run_all(gc, {n: _insert(n) for n in names})
    _wait_until(lambda: _queued(gc) == 7)
    release.set()
    for thread in [leader, *threads]:
        thread.join(10)
    assert len(answers) == 7 and all(v == f"done:{k}" for k, v in answers.items())
    assert gc.stats.largest_group == 3
    assert gc.stats.commits == 1 + 3  # the leader, then groups of 3, 3 and 1


def test_max_group_must_be_positive(db: Engine) -> None:
    with pytest.raises(ValueError, match="max_group"):
        GroupCommitter(db, max_group=0)


def test_a_leader_whose_operation_is_not_in_the_first_group_leads_until_it_is_done(
    db: Engine,
) -> None:
    # More operations queued than one group takes, and ours last: whoever leads commits
    # the oldest first, then leads again. (Once, the leader gave up after one group and
    # its own operation was reported lost.)
    gc = GroupCommitter(db, max_group=2)
    others = [_Request(_insert(f"o{i}"), order_key=f"o{i}") for i in range(3)]
    gc._queue.extend(others)
    assert gc.run(_insert("me"), order_key="me") == "done:me"
    assert [(o.done, o.result) for o in others] == [(True, f"done:o{i}") for i in range(3)]
    assert _stored(db) == ["me", "o0", "o1", "o2"]
    assert (gc.stats.operations, gc.stats.commits) == (4, 2)


def test_a_group_opens_its_scope_inside_its_transaction_with_its_keys(db: Engine) -> None:
    """The worker's scope locks the group's workflows at once (`ledger.db.workflows_locked`)
    and reads ahead what their operations will read: it must see every key and every hint
    of the group, in the group's order, in the group's transaction, around the work."""
    seen: list[tuple[list[str], list[Any], list[str]]] = []
    log: list[str] = []

    @contextmanager
    def scope(conn: Connection, keys: list[str], hints: list[Any]) -> Iterator[None]:
        conn.execute(rows.insert().values(who="scope"))
        log.append("open")
        yield
        log.append("close")
        seen.append((keys, hints, list(log)))

    gc = GroupCommitter(db, scope=scope)
    keys = ["wf-c", "wf-a", "wf-b"]
    _as_one_group(gc, db, {k: _insert(k, log) for k in keys})
    ordered = sorted(keys)
    hints = [f"hint-{k}" for k in ordered]
    assert seen[-1] == (ordered, hints, ["open", "close", "open", *ordered, "close"])
    assert seen[0][:2] == (["0"], [None]), "the leader's operation had no hint"
    # The scope's write committed with the group: it ran in the same transaction.
    assert _stored(db).count("scope") == 2


def test_operations_split_after_a_failure_run_without_the_scope(db: Engine) -> None:
    opened: list[list[str]] = []

    @contextmanager
    def scope(conn: Connection, keys: list[str], hints: list[Any]) -> Iterator[None]:
        opened.append(keys)
        yield

    def boom(conn: Connection) -> str:
        raise ValueError("a caller's mistake")

    gc = GroupCommitter(db, scope=scope)
    answers = _as_one_group(gc, db, {"wf-a": _insert("a"), "wf-b": boom})
    assert answers["wf-a"] == "done:a" and isinstance(answers["wf-b"], ValueError)
    assert opened == [["0"], ["wf-a", "wf-b"]]
