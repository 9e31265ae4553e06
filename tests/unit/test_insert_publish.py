"""`Workflow.insert(..., publisher=...)`: the inserting process publishes the new
workflow's first steps itself, right after its commit, instead of waking the dispatcher.

The roots are marked dispatched in the insert's own transaction, so the dispatcher leaves
them alone; a publish that fails undoes the mark (and wakes the dispatcher), so they are
published on its next pass; a process that dies between the commit and the publish leaves
them dispatched with no message, which the reconciler's stale-dispatch sweep repairs, as
for any dispatcher that died there.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import Workflow
from streamflow.engine.maintenance import Maintenance
from streamflow.streams import Publisher, StreamKeys, decode_ready
from streamflow.streams.transport import RedisTransport
from tests.workers import Noop


class _Down:
    """A transport whose Redis is unreachable: every call raises."""

    def __getattr__(self, name: str) -> Any:
        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise ConnectionError("Redis is down")

        return fail


def _two_roots_and_a_join() -> Workflow:
    return (
        Workflow.new("fan-in")
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("join", Noop.new(), deps=["a", "b"])
    )


def _ready(transport: RedisTransport, keys: StreamKeys) -> list[tuple[str, str]]:
    entries = transport.client.xrange(keys.ready_for("default", "x"))
    return [(m.workflow_id, m.step) for m in (decode_ready(f) for _, f in entries)]


def _dispatched(engine: Engine, workflow_id: str) -> dict[str, bool]:
    s = t.steps
    with engine.connect() as conn:
        rows = conn.execute(
            select(s.c.name, s.c.dispatched_at).where(s.c.workflow_id == workflow_id)
        ).all()
    return {name: at is not None for name, at in rows}


def test_the_roots_are_published_by_the_insert_and_marked_dispatched(
    engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    persisted = _two_roots_and_a_join().insert(engine, publisher=Publisher(transport, keys))
    wid = persisted.id
    assert sorted(_ready(transport, keys)) == [(wid, "a"), (wid, "b")]
    assert _dispatched(engine, wid) == {"a": True, "b": True, "join": False}
    # The dispatcher finds nothing left to send.
    maintenance = Maintenance(engine, transport, keys)
    maintenance.tick()
    assert maintenance.stats.dispatched == 0
    assert len(_ready(transport, keys)) == 2


def test_a_failed_publish_leaves_the_roots_to_the_dispatcher(
    engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    down = Publisher(_Down(), keys)  # type: ignore[arg-type]
    persisted = _two_roots_and_a_join().insert(engine, publisher=down)
    wid = persisted.id
    assert _dispatched(engine, wid) == {"a": False, "b": False, "join": False}
    maintenance = Maintenance(engine, transport, keys)
    maintenance.tick()
    assert maintenance.stats.dispatched == 2
    assert sorted(_ready(transport, keys)) == [(wid, "a"), (wid, "b")]


def test_a_root_awaiting_a_signal_is_not_published(
    engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    wf = Workflow.new("gated").add("a", Noop.new()).add("approve", Noop.new(), await_signal="go")
    wid = wf.insert(engine, publisher=Publisher(transport, keys)).id
    assert _ready(transport, keys) == [(wid, "a")]
    assert _dispatched(engine, wid) == {"a": True, "approve": False}


def test_a_publisher_inside_the_callers_transaction_is_refused_before_any_write(
    engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    """Publishing must follow the commit, which the caller's transaction owns."""
    with engine.begin() as conn, pytest.raises(ValueError, match="commit"):
        _two_roots_and_a_join().insert(conn, publisher=Publisher(transport, keys))
    with engine.connect() as conn:
        assert conn.execute(select(t.workflows.c.id)).all() == []
    assert _ready(transport, keys) == []


def test_publisher_connect_needs_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMFLOW_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="STREAMFLOW_REDIS_URL"):
        Publisher.connect()


def test_publisher_connect_takes_the_settings_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFLOW_STREAM_PREFIX", "myapp")
    monkeypatch.setenv("STREAMFLOW_STREAM_PARTITIONS", "4")
    publisher = Publisher.connect("redis://127.0.0.1:6379/15")
    assert publisher.keys == StreamKeys(prefix="myapp", partitions=4)
