"""The dispatcher is woken by the commit that needs it (PostgreSQL NOTIFY), not its poll.

Each test gives the dispatcher a 60-second poll and waits at most 10 seconds: a step can
only be published in time if the notification woke it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ledger.db import make_engine
from ledger.transitions import complete_step
from streamflow import Workflow
from streamflow.engine.maintenance import Maintenance, MaintenanceConfig
from streamflow.engine.wakeup import DispatchWakeup
from streamflow.streams.codec import decode_ready
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import RedisTransport, connect
from tests.workers import Noop

pytestmark = pytest.mark.postgres


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def streams(redis_url: str) -> Iterator[tuple[RedisTransport, StreamKeys]]:
    keys = StreamKeys(prefix=f"wake{uuid.uuid4().hex[:10]}")
    transport = connect(redis_url)
    yield transport, keys
    mine = list(transport.client.scan_iter(match=keys.pattern))
    if mine:
        transport.client.delete(*mine)


@pytest.fixture
def dispatcher(
    pg_engine: Engine, streams: tuple[RedisTransport, StreamKeys]
) -> Iterator[Maintenance]:
    transport, keys = streams
    maintenance = Maintenance(pg_engine, transport, keys, MaintenanceConfig(poll_seconds=60))
    stop = threading.Event()
    thread = threading.Thread(target=maintenance.run, args=(stop,))
    thread.start()
    try:
        # Listening only after its first pass: what was committed before is dispatched
        # by that pass, what is committed after wakes it.
        _until(lambda: maintenance.wakeup is not None and maintenance.wakeup.listening, "LISTEN")
        yield maintenance
    finally:
        stop.set()
        thread.join(70)
        assert not thread.is_alive()


def _published(streams: tuple[RedisTransport, StreamKeys], workflow_id: str) -> list[str]:
    transport, keys = streams
    entries = transport.client.xrange(keys.ready("default"))
    return [m.step for m in (decode_ready(f) for _, f in entries) if m.workflow_id == workflow_id]


def test_inserting_a_workflow_wakes_the_dispatcher(
    pg_engine: Engine, dispatcher: Maintenance, streams: tuple[RedisTransport, StreamKeys]
) -> None:
    wid = Workflow.insert(Workflow.new("wake").add("root", Noop.new()), pg_engine).id
    _until(lambda: _published(streams, wid) == ["root"], "the root to be published")


def test_a_completion_from_the_api_wakes_the_dispatcher_for_its_children(
    pg_engine: Engine, dispatcher: Maintenance, streams: tuple[RedisTransport, StreamKeys]
) -> None:
    wf = Workflow.new("wake").add("a", Noop.new()).add("b", Noop.new(), deps=["a"])
    wid = Workflow.insert(wf, pg_engine).id
    _until(lambda: _published(streams, wid) == ["a"], "the root to be published")
    with pg_engine.begin() as conn:
        complete_step(conn, wid, "a", "completed", None, source="api")
    _until(lambda: _published(streams, wid) == ["a", "b"], "the released child to be published")


def test_without_postgresql_the_wait_is_the_poll(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'wake.db'}")
    try:
        wakeup = DispatchWakeup(engine, threading.Event())
        assert wakeup.wait(0.05) is False
        assert not wakeup.listening
    finally:
        engine.dispose()


def test_a_listening_connection_that_breaks_falls_back_to_polling(
    pg_engine: Engine, postgres_url: str
) -> None:
    wakeup = DispatchWakeup(pg_engine, threading.Event())
    try:
        assert wakeup.wait(0.01) is False
        assert wakeup.listening
        assert wakeup._conn is not None
        pid = wakeup._conn.info.backend_pid
        with pg_engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        assert wakeup.wait(0.2) is False  # the break is noticed, logged, and polled past
        assert not wakeup.listening
    finally:
        wakeup.close()


def test_a_burst_of_commits_is_served_by_a_bounded_number_of_passes(
    pg_engine: Engine, streams: tuple[RedisTransport, StreamKeys]
) -> None:
    """Every insert notifies; passes come at most once per `min_pass_seconds`, so a burst
    costs a few passes, not one per commit, and every root is still published."""
    transport, keys = streams
    config = MaintenanceConfig(poll_seconds=60, min_pass_seconds=0.05)
    maintenance = Maintenance(pg_engine, transport, keys, config)
    stop = threading.Event()
    thread = threading.Thread(target=maintenance.run, args=(stop,))
    thread.start()
    try:
        _until(lambda: maintenance.wakeup is not None and maintenance.wakeup.listening, "LISTEN")
        before = maintenance.stats.passes
        started = time.monotonic()
        ids = [
            Workflow.insert(Workflow.new("burst").add("root", Noop.new()), pg_engine).id
            for _ in range(60)
        ]
        _until(lambda: all(_published(streams, wid) == ["root"] for wid in ids), "every root")
        elapsed = time.monotonic() - started
        passes = maintenance.stats.passes - before
        assert 1 <= passes <= elapsed / config.min_pass_seconds + 2, (passes, elapsed)
    finally:
        stop.set()
        thread.join(70)
        assert not thread.is_alive()


def test_a_drain_takes_every_notification_already_sent(pg_engine: Engine) -> None:
    """Woken by the first of several commits, the dispatcher drains the others before its
    pass (which serves them all), so they do not wake it again after."""
    from ledger.db import notify_dispatcher

    wakeup = DispatchWakeup(pg_engine, threading.Event())
    try:
        assert wakeup.wait(0.01) is False and wakeup.listening
        for _ in range(3):
            with pg_engine.begin() as conn:
                notify_dispatcher(conn)
        assert wakeup.wait(5) is True
        wakeup.drain()
        assert wakeup.wait(0.05) is False
    finally:
        wakeup.close()
