"""The stream transport's contract, run against a real Redis and against fakeredis.

The same cases run on both: fakeredis backs the embedded default, real Redis backs
production, and fakeredis has had bugs exactly where this seam lives (pending lists,
claims). A real `redis-server` is also killed and restarted empty at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import fakeredis
import pytest
import redis

from ledger.rules import CompletionStatus
from streamflow.streams import (
    CompletionEvent,
    Entry,
    Publisher,
    ReadyMessage,
    RedisTransport,
    StreamKeys,
    connect,
    decode_completion,
    decode_ready,
)

T = TypeVar("T")

GROUP = "g"
OTHER_GROUP = "lagging"


def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll until `condition()` is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Backend:
    name: str
    transport: RedisTransport
    keys: StreamKeys
    recreated: list[tuple[str, str]] = field(default_factory=list)

    @property
    def client(self) -> redis.Redis:
        return self.transport.client

    def drop_all_keys(self) -> None:
        """What a FLUSHALL or an empty restart does to this test's streams and groups.

        The real server is shared with other tests, so only this test's keys go.
        """
        keys = list(self.client.scan_iter(match=self.keys.pattern))
        if keys:
            self.client.delete(*keys)


@pytest.fixture(params=["redis", "fakeredis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    keys = StreamKeys(f"sftest-{uuid.uuid4().hex[:12]}")
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        transport = connect(url, socket_timeout=5.0, socket_connect_timeout=1.0)
    else:
        # A private server per test, not the process-wide embedded one: tests stay isolated.
        server = fakeredis.FakeServer(version=(7,))
        transport = RedisTransport(fakeredis.FakeRedis(server=server, decode_responses=True))
    b = Backend(request.param, transport, keys)
    transport.on_group_recreated = lambda stream, group: b.recreated.append((stream, group))
    try:
        yield b
    finally:
        b.drop_all_keys()
        transport.client.close()


def _add(b: Backend, stream: str, n: int) -> list[str]:
    return [b.transport.add(stream, {"n": str(i)}) for i in range(n)]


def _wait_idle(b: Backend, stream: str, group: str, n: int, idle_ms: int) -> None:
    """Poll the pending list until `n` entries have been idle at least `idle_ms`."""
    wait_for(
        lambda: len(b.client.xpending_range(stream, group, "-", "+", 1000, idle=idle_ms)) >= n,
        what=f"{n} pending entries idle for {idle_ms} ms",
    )


def _read_all(b: Backend, consumer: str, stream: str, group: str = GROUP) -> list[Entry]:
    return b.transport.read_group(group, consumer, [stream], count=1000, block_ms=0)


# -- add, read, ack ------------------------------------------------------------------------


def test_add_read_ack(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.ready("default")
    assert t.ensure_group(stream, GROUP) is True
    assert t.ensure_group(stream, GROUP) is False  # BUSYGROUP is not an error
    ids = _add(backend, stream, 3)
    assert t.stream_length(stream) == 3

    entries = t.read_group(GROUP, "c1", [stream], count=10, block_ms=100)
    assert [e.id for e in entries] == ids
    assert entries[0] == Entry(stream, ids[0], {"n": "0"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in entries[2].fields.items())
    assert t.pending_summary(stream, GROUP).count == 3
    assert t.pending_summary(stream, GROUP).lowest_id == ids[0]

    assert t.ack(stream, GROUP, ids[:2]) == 2
    assert t.ack(stream, GROUP, ids[:2]) == 0  # already acknowledged
    assert t.ack(stream, GROUP, []) == 0
    assert t.pending_summary(stream, GROUP).lowest_id == ids[2]
    assert t.ack(stream, GROUP, ids[2:]) == 1
    assert t.pending_summary(stream, GROUP).count == 0
    assert t.pending_summary(stream, GROUP).lowest_id is None


def test_entries_added_before_the_group_exists_are_delivered(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    ids = _add(backend, stream, 2)  # a publisher ran before any consumer started
    t.ensure_group(stream, GROUP)
    assert [e.id for e in _read_all(backend, "c1", stream)] == ids


def test_read_several_streams_at_once(backend: Backend) -> None:
    t, keys = backend.transport, backend.keys
    streams = keys.ready_streams(["a", "b"])
    for s in streams:
        t.ensure_group(s, GROUP)
    ids = t.add_many([(streams[0], {"q": "a"}), (streams[1], {"q": "b"})])
    entries = t.read_group(GROUP, "c1", streams, count=10, block_ms=0)
    assert {(e.stream, e.id, e.fields["q"]) for e in entries} == {
        (streams[0], ids[0], "a"),
        (streams[1], ids[1], "b"),
    }


def test_blocking_read_returns_when_an_entry_arrives(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    started = time.monotonic()
    # An empty blocking read waits out its block (fakeredis answers at once; the
    # transport makes up for it) rather than letting a reader loop spin.
    assert t.read_group(GROUP, "c1", [stream], count=10, block_ms=200) == []
    assert 0.15 < time.monotonic() - started < 2.0

    timer = threading.Timer(0.1, lambda: t.add(stream, {"late": "1"}))
    timer.start()
    try:
        entries = t.read_group(GROUP, "c1", [stream], count=1, block_ms=3000)
    finally:
        timer.join()
    assert [e.fields for e in entries] == [{"late": "1"}]


def test_two_consumers_in_one_group_split_the_entries(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.ready("default")
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 10)
    first = t.read_group(GROUP, "c1", [stream], count=4, block_ms=0)
    second = t.read_group(GROUP, "c2", [stream], count=100, block_ms=0)
    assert len(first) == 4
    assert len(second) == 6
    assert sorted(e.id for e in first + second) == sorted(ids)
    assert t.read_group(GROUP, "c3", [stream], count=100, block_ms=50) == []


# -- taking over a dead consumer's entries ----------------------------------------------------


def test_autoclaim_takes_over_a_dead_consumers_entries(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 3)
    assert len(_read_all(backend, "dead", stream)) == 3  # ...and "dead" never acks

    # Not idle long enough yet: nothing moves.
    assert t.autoclaim(stream, GROUP, "rescuer", min_idle_ms=60_000, count=10).claimed == ()

    _wait_idle(backend, stream, GROUP, 3, idle_ms=60)
    result = t.autoclaim(stream, GROUP, "rescuer", min_idle_ms=50, count=10)
    assert [c.entry.id for c in result.claimed] == ids
    assert [c.deliveries for c in result.claimed] == [2, 2, 2]
    assert result.claimed[0].entry == Entry(stream, ids[0], {"n": "0"})
    assert result.deleted_ids == ()

    # The rescuer dies too; a third consumer takes over and the count keeps rising.
    _wait_idle(backend, stream, GROUP, 3, idle_ms=60)
    again = t.autoclaim(stream, GROUP, "third", min_idle_ms=50, count=10)
    assert [c.deliveries for c in again.claimed] == [3, 3, 3]
    assert t.ack(stream, GROUP, ids) == 3


def test_autoclaim_is_bounded_by_count_and_walks_the_pending_list(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 5)
    _read_all(backend, "dead", stream)
    _wait_idle(backend, stream, GROUP, 5, idle_ms=60)
    seen: list[str] = []
    for _ in range(3):
        batch = t.autoclaim(stream, GROUP, "rescuer", min_idle_ms=50, count=2).claimed
        assert len(batch) <= 2
        seen.extend(c.entry.id for c in batch)
    assert sorted(seen) == ids


def test_autoclaim_reports_and_drops_trimmed_entries(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 3)
    _read_all(backend, "dead", stream)
    backend.client.xdel(stream, ids[1])  # gone from the stream, still pending

    _wait_idle(backend, stream, GROUP, 3, idle_ms=30)
    result = t.autoclaim(stream, GROUP, "rescuer", min_idle_ms=20, count=10)
    assert [c.entry.id for c in result.claimed] == [ids[0], ids[2]]
    assert result.deleted_ids == (ids[1],)
    assert t.pending_summary(stream, GROUP).count == 2  # the dangling reference is gone


def test_autoclaim_on_a_missing_group_claims_nothing(backend: Backend) -> None:
    t = backend.transport
    result = t.autoclaim(backend.keys.completions, GROUP, "c", min_idle_ms=0, count=5)
    assert result.claimed == ()
    assert result.deleted_ids == ()
    assert t.pending_summary(backend.keys.completions, GROUP).count == 0


def test_dead_letter_moves_the_entry_and_acks_it(backend: Backend) -> None:
    t, keys = backend.transport, backend.keys
    stream = keys.completions
    t.ensure_group(stream, GROUP)
    [entry_id] = _add(backend, stream, 1)
    [entry] = _read_all(backend, "c1", stream)

    t.dead_letter(
        entry, GROUP, keys.dead_letter, reason="malformed: missing field 'v'", deliveries=4
    )

    assert t.pending_summary(stream, GROUP).count == 0
    [(_, fields)] = backend.client.xrange(keys.dead_letter)
    assert fields == {
        "n": "0",
        "dl_stream": stream,
        "dl_id": entry_id,
        "dl_group": GROUP,
        "dl_reason": "malformed: missing field 'v'",
        "dl_deliveries": "4",
    }


def test_dead_letter_after_the_group_vanished_still_keeps_the_copy(backend: Backend) -> None:
    t, keys = backend.transport, backend.keys
    t.ensure_group(keys.completions, GROUP)
    _add(backend, keys.completions, 1)
    [entry] = _read_all(backend, "c1", keys.completions)
    backend.drop_all_keys()
    t.dead_letter(entry, GROUP, keys.dead_letter, reason="poison", deliveries=6)
    assert t.stream_length(keys.dead_letter) == 1


# -- Redis flushed or restarted empty ---------------------------------------------------------


def test_read_group_recreates_a_group_lost_to_a_flush(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    t, stream = backend.transport, backend.keys.ready("default")
    t.ensure_group(stream, GROUP)
    _add(backend, stream, 2)
    assert len(_read_all(backend, "c1", stream)) == 2

    backend.drop_all_keys()
    with caplog.at_level(logging.WARNING, logger="streamflow.streams"):
        assert t.read_group(GROUP, "c1", [stream], count=10, block_ms=50) == []
    assert backend.recreated == [(stream, GROUP)]
    [record] = [r for r in caplog.records if r.getMessage() == "stream.group_recreated"]
    assert record.__dict__["sf_fields"] == {"stream": stream, "group": GROUP, "consumer": "c1"}

    [new_id] = _add(backend, stream, 1)
    assert [e.id for e in _read_all(backend, "c1", stream)] == [new_id]


def test_read_group_creates_a_group_that_never_existed(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.ready("fresh")
    assert t.read_group(GROUP, "c1", [stream], count=10, block_ms=0) == []
    assert backend.recreated == [(stream, GROUP)]
    assert t.ensure_group(stream, GROUP) is False


def test_a_publisher_recreating_the_stream_first_loses_nothing(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    backend.drop_all_keys()
    # After the restart a publisher gets there before the consumer: XADD makes a stream
    # with no groups. The recreated group starts at 0, so the entry is still delivered.
    [entry_id] = _add(backend, stream, 1)
    assert [e.id for e in _read_all(backend, "c1", stream)] == [entry_id]


# -- trimming -----------------------------------------------------------------------------


def _ids_in(b: Backend, stream: str) -> list[str]:
    return [entry_id for entry_id, _ in b.client.xrange(stream)]


def test_trim_never_removes_pending_or_undelivered_entries(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    t.ensure_group(stream, GROUP)
    t.ensure_group(stream, OTHER_GROUP)
    ids = _add(backend, stream, 10)

    # GROUP has read everything and acknowledged the first six; e6..e9 are pending.
    assert len(_read_all(backend, "a", stream, GROUP)) == 10
    t.ack(stream, GROUP, ids[:6])
    # OTHER_GROUP lags: it read three, acknowledged two; e2 pending, e3.. undelivered.
    assert len(t.read_group(OTHER_GROUP, "b", [stream], count=3, block_ms=0)) == 3
    t.ack(stream, OTHER_GROUP, ids[:2])

    assert t.trim_acknowledged(stream, [GROUP, OTHER_GROUP]) == 2
    assert _ids_in(backend, stream) == ids[2:]

    # The lagging group catches up on three more; its bound moves past e4.
    t.ack(stream, OTHER_GROUP, [ids[2]])
    later = t.read_group(OTHER_GROUP, "b", [stream], count=2, block_ms=0)
    t.ack(stream, OTHER_GROUP, [e.id for e in later])
    assert t.trim_acknowledged(stream, [GROUP, OTHER_GROUP]) == 3
    assert _ids_in(backend, stream) == ids[5:]

    # GROUP acknowledges everything; OTHER_GROUP has nothing pending but e5.. undelivered.
    t.ack(stream, GROUP, ids[6:])
    assert t.trim_acknowledged(stream, [GROUP, OTHER_GROUP]) == 0
    assert _ids_in(backend, stream) == ids[5:]

    # What GROUP left pending is still claimable after the trims: no dangling reference.
    assert len(_read_all(backend, "b", stream, OTHER_GROUP)) == 5
    assert t.trim_acknowledged(stream, [GROUP, OTHER_GROUP]) == 0  # all 5 pending in b
    _wait_idle(backend, stream, OTHER_GROUP, 5, idle_ms=30)
    assert len(t.autoclaim(stream, OTHER_GROUP, "b2", min_idle_ms=20, count=10).claimed) == 5
    t.ack(stream, OTHER_GROUP, ids[5:])
    assert t.trim_acknowledged(stream, [GROUP, OTHER_GROUP]) == 5
    assert t.stream_length(stream) == 0


def test_trim_with_a_single_group_keeps_its_pending_entries(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.ready("default")
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 4)
    _read_all(backend, "a", stream)
    t.ack(stream, GROUP, [ids[0], ids[2]])  # e1 and e3 still pending
    assert t.trim_acknowledged(stream, [GROUP]) == 1
    assert _ids_in(backend, stream) == ids[1:]


def test_trim_refuses_to_guess(backend: Backend) -> None:
    t, stream = backend.transport, backend.keys.completions
    assert t.trim_acknowledged(stream, [GROUP]) == 0  # no stream
    t.ensure_group(stream, GROUP)
    ids = _add(backend, stream, 3)
    _read_all(backend, "a", stream)
    t.ack(stream, GROUP, ids)
    assert t.trim_acknowledged(stream, []) == 0  # no groups named
    assert t.trim_acknowledged(stream, [GROUP, "never-created"]) == 0
    assert t.stream_length(stream) == 3
    assert t.trim_acknowledged(stream, [GROUP]) == 3


# -- publishing -----------------------------------------------------------------------------


def test_publisher_writes_to_the_right_streams(backend: Backend) -> None:
    publisher = Publisher(backend.transport, backend.keys)
    event = CompletionEvent("wf1", "a", CompletionStatus.COMPLETED, 1, at_ms=1)
    ready = [ReadyMessage("wf1", "b", "default", at_ms=2), ReadyMessage("wf1", "c", "io", at_ms=2)]
    assert publisher.publish_completion(event) is True
    assert publisher.publish_ready(ready) is True
    assert publisher.publish_ready([]) is True

    [(_, fields)] = backend.client.xrange(backend.keys.completions)
    assert decode_completion(fields) == event
    [(_, fields)] = backend.client.xrange(backend.keys.ready("io"))
    assert decode_ready(fields) == ready[1]
    assert backend.transport.stream_length(backend.keys.ready("default")) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_publisher_returns_false_when_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = connect(f"redis://127.0.0.1:{_closed_port()}/0", socket_connect_timeout=0.5)
    publisher = Publisher(transport, StreamKeys())
    event = CompletionEvent("wf1", "a", CompletionStatus.FAILED, 3, at_ms=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="streamflow.streams"):
        assert publisher.publish_completion(event) is False
        assert publisher.publish_ready([ReadyMessage("wf1", "b", "q", at_ms=1)] * 2) is False
    assert time.monotonic() - started < 5.0
    records = [r for r in caplog.records if r.name == "streamflow.streams"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "stream.publish_failed"),
        ("WARNING", "stream.publish_failed"),
    ]
    completion, ready = (r.__dict__["sf_fields"] for r in records)
    assert completion["kind"] == "completion"
    assert completion["streams"] == ["{streamflow}:completions"]
    assert (completion["workflow_id"], completion["step"]) == ("wf1", "a")
    assert completion["error"] == "ConnectionError"
    assert "\n" not in completion["detail"]
    assert (ready["kind"], ready["messages"]) == ("ready", 2)
    with pytest.raises(redis.exceptions.ConnectionError):
        transport.ping()  # the transport itself lets the outage through
    transport.client.close()


# -- construction ---------------------------------------------------------------------------


def test_embedded_transports_share_one_in_process_server() -> None:
    first, second = connect(None), connect(None)
    stream = StreamKeys(f"sftest-{uuid.uuid4().hex[:12]}").completions
    entry_id = first.add(stream, {"x": "1"})
    assert [i for i, _ in second.client.xrange(stream)] == [entry_id]
    second.client.delete(stream)


def test_connect_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="redis://"):
        connect("http://127.0.0.1:6379")


def test_connect_keeps_blocking_reads_inside_the_socket_timeout() -> None:
    transport = connect("redis://127.0.0.1:1/0", socket_timeout=10.0)
    assert transport.max_block_ms == 8_000
    assert connect("redis://127.0.0.1:1/0", socket_timeout=1.0).max_block_ms == 500


# -- a real server killed and restarted empty ----------------------------------------------


@pytest.fixture
def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server not installed")
        pytest.skip("redis-server not installed")
    return binary


class DisposableRedis:
    """A `redis-server` without persistence on a free port, for killing."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            wait_for(lambda: self._answers(probe), timeout=10.0, what="redis-server to start")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def disposable_redis(redis_server_binary: str, tmp_path: Path) -> Iterator[DisposableRedis]:
    server = DisposableRedis(redis_server_binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _reachable(transport: RedisTransport) -> bool:
    try:
        transport.ping()
    except redis.ConnectionError:
        return False
    return True


def test_survives_redis_killed_and_restarted_empty(disposable_redis: DisposableRedis) -> None:
    keys = StreamKeys()
    queue = keys.ready("default")
    transport = connect(disposable_redis.url, socket_timeout=2.0, socket_connect_timeout=0.5)
    recreated: list[tuple[str, str]] = []
    transport.on_group_recreated = lambda stream, group: recreated.append((stream, group))
    publisher = Publisher(transport, keys)
    message = ReadyMessage("wf1", "a", "default", at_ms=1)
    try:
        transport.ensure_group(queue, keys.workers_group)
        assert publisher.publish_ready([message]) is True
        assert len(transport.read_group(keys.workers_group, "w1", [queue], 10, 100)) == 1

        disposable_redis.kill()
        started = time.monotonic()
        assert publisher.publish_ready([message]) is False
        assert (
            publisher.publish_completion(
                CompletionEvent("wf1", "a", CompletionStatus.COMPLETED, 1, at_ms=2)
            )
            is False
        )
        assert time.monotonic() - started < 5.0
        with pytest.raises(redis.ConnectionError):
            transport.read_group(keys.workers_group, "w1", [queue], 10, 100)

        disposable_redis.start()  # same port, no data: streams and groups are gone
        wait_for(lambda: _reachable(transport), what="the transport to reconnect")
        assert transport.read_group(keys.workers_group, "w1", [queue], 10, 100) == []
        assert recreated == [(queue, keys.workers_group)]

        assert publisher.publish_ready([message]) is True
        [entry] = transport.read_group(keys.workers_group, "w1", [queue], 10, 100)
        assert decode_ready(entry.fields) == message
    finally:
        transport.client.close()
