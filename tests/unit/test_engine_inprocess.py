"""Engine components driven directly, in-process: fakeredis streams and a SQLite ledger.

`connect(None)` is one fakeredis server shared by the whole process, so every test works
under its own `StreamKeys` prefix. Components run the way their processes run them — a
`WorkerRuntime` or `CompletionConsumer` loop in a thread with a stop event — or one step at
a time (`CompletionConsumer.process`, `Maintenance.tick`). Faults are injected at the
transport seam by `FlakyTransport`, never by patching internals. Conditions are polled
with deadlines, never slept on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sqlalchemy import Connection, Engine, select

from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.rules import CompletionStatus
from ledger.transitions import complete_step
from streamflow import Workflow
from streamflow.engine.common import now_ms, utcnow
from streamflow.engine.consumer import CompletionConsumer, ConsumerConfig
from streamflow.engine.maintenance import Maintenance
from streamflow.engine.runner import Runner
from streamflow.engine.worker_runtime import WorkerConfig, WorkerRuntime
from streamflow.logs import JsonLineFormatter
from streamflow.streams import (
    CompletionEvent,
    Fields,
    ReadyMessage,
    RedisTransport,
    StreamKeys,
    connect,
    decode_ready,
    encode,
)
from tests import engine_app as app
from tests.ledger.helpers import recount
from tests.workers import Noop

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -- the transport seam, with faults ------------------------------------------------------------


class FlakyTransport(RedisTransport):
    """The in-process transport, raising redis.ConnectionError where a test asks.

    `fail[name] = n` fails the next n calls of `name`; `down` holds names that fail until
    removed. `failed` counts the failures injected, per name.
    """

    def __init__(self, inner: RedisTransport) -> None:
        super().__init__(inner.client)
        self.fail: Counter[str] = Counter()
        self.down: set[str] = set()
        self.failed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _maybe_fail(self, name: str) -> None:
        with self._lock:
            if name not in self.down and self.fail[name] <= 0:
                return
            if name not in self.down:
                self.fail[name] -= 1
            self.failed[name] += 1
        raise redis.ConnectionError(f"injected fault: {name}")

    def add(self, stream: str, fields: Fields) -> str:
        self._maybe_fail("add")
        return super().add(stream, fields)

    def add_many(self, items: Sequence[tuple[str, Fields]]) -> list[str]:
        self._maybe_fail("add_many")
        return super().add_many(items)

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        self._maybe_fail("ack")
        return super().ack(stream, group, ids)


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def perform_log(tmp_path: Path) -> Path:
    return tmp_path / "performs.jsonl"


@contextmanager
def running(target: Callable[[threading.Event], None]) -> Iterator[threading.Thread]:
    """Run a component's loop in a thread; on exit, stop it and wait for it to finish.

    An exception escaping the loop fails the test (pytest reports unhandled thread
    exceptions as warnings, and warnings are errors here).
    """
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


def runs(log: Path) -> Counter[tuple[str, str, int]]:
    return Counter((r["wf"], r["step"], r["attempt"]) for r in app.perform_log(log))


def evidence(engine: Engine, classification: str) -> list[Any]:
    e = t.evidence
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(e.c.workflow_id, e.c.step, e.c.kind, e.c.reason, e.c.payload, e.c.dedupe_key)
                .where(e.c.classification == classification)
                .order_by(e.c.id)
            ).all()
        )


def step_row(engine: Engine, workflow_id: str, step: str) -> Any:
    s = t.steps
    with engine.connect() as conn:
        return conn.execute(
            select(s.c.state, s.c.attempt, s.c.dispatched_at).where(
                s.c.workflow_id == workflow_id, s.c.name == step
            )
        ).one()


def entries(transport: RedisTransport, stream: str) -> list[tuple[str, dict[str, str]]]:
    reply: list[tuple[str, dict[str, str]]] = transport.client.xrange(stream)  # type: ignore[assignment]
    return [(str(i), dict(f)) for i, f in reply]


def completed_event(engine: Engine, name: str = "done") -> tuple[str, Fields]:
    """A workflow whose one step has completed, and that completion as a stream entry."""
    wid = Workflow.insert(Workflow.new(name).add("a", Noop.new()), engine).id
    Workflow.complete_step(engine, wid, "a", status="completed")
    return wid, encode(CompletionEvent(wid, "a", CompletionStatus.COMPLETED, 1, now_ms()))


def finished(engine: Engine, workflow_id: str) -> bool:
    return Workflow.get(engine, workflow_id).finished


# -- malformed entries ---------------------------------------------------------------------------


def test_malformed_completion_entries_are_dead_lettered_and_the_consumer_keeps_going(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    wid, good = completed_event(sqlite_engine)
    bad: dict[str, Fields] = {
        "no version": {k: v for k, v in good.items() if k != "v"},
        "a future version": {**good, "v": "2"},
        "a ready message": encode(ReadyMessage(wid, "a", "default", 1)),
        "a forged key": {**good, "key": f"{wid}:a:1:failed"},
        "attempt not decimal": {**good, "attempt": "1.0"},
        "unknown status": {**good, "status": "exploded"},
        "not ours at all": {"hello": "world"},
        "an overlong id": {**good, "workflow_id": "w" * 80},
    }
    for fields in bad.values():
        transport.add(keys.completions, fields)
    transport.add(keys.completions, good)
    consumer = CompletionConsumer(
        sqlite_engine, transport, keys, ConsumerConfig(name="c1", block_ms=20)
    )
    with running(consumer.run) as thread:
        until(lambda: len(evidence(sqlite_engine, "dead_letter")) == len(bad), "dead letters")
        until(lambda: evidence(sqlite_engine, "consumed"), "the good event consumed")
        # The loop is still reading: one more bad entry after the first batch.
        transport.add(keys.completions, {"v": "1", "kind": "completion"})
        until(lambda: len(evidence(sqlite_engine, "dead_letter")) == len(bad) + 1, "one more")
        assert thread.is_alive()

    rows = evidence(sqlite_engine, "dead_letter")
    assert {r.kind for r in rows} == {"event"}
    assert all(r.reason and r.payload["stream"] == keys.completions for r in rows)
    assert {r.workflow_id for r in rows} == {wid, "-", "w" * 32}
    dead = entries(transport, keys.dead_letter)
    assert len(dead) == len(bad) + 1
    assert {f["dl_group"] for _, f in dead} == {keys.completion_group}
    assert all(f["dl_reason"] and f["dl_stream"] == keys.completions for _, f in dead)
    assert transport.pending_summary(keys.completions, keys.completion_group).count == 0
    assert (consumer.stats.consumed, consumer.stats.dead_lettered) == (1, len(bad) + 1)


def test_malformed_ready_entries_are_dead_lettered_and_the_worker_keeps_going(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = Workflow.new("ready", {"log": str(perform_log)}).add("a", app.Echo.new())
    wid = Workflow.insert(wf, sqlite_engine).id
    real = encode(ReadyMessage(wid, "a", "default", 1))
    bad: dict[str, Fields] = {
        "no version": {k: v for k, v in real.items() if k != "v"},
        "a completion": encode(CompletionEvent(wid, "a", CompletionStatus.COMPLETED, 1, 1)),
        "priority not an integer": {**real, "priority": "high"},
        "no step": {k: v for k, v in real.items() if k != "step"},
        "not ours at all": {"hello": "world"},
    }
    stream = keys.ready("default")
    for fields in bad.values():
        transport.add(stream, fields)
    # Well formed but naming nothing in the ledger: acknowledged, not dead-lettered.
    transport.add(stream, encode(ReadyMessage("0" * 32, "ghost", "default", 1)))
    worker = worker_for(sqlite_engine, transport, keys)
    with running(worker.run) as thread:
        until(lambda: len(evidence(sqlite_engine, "dead_letter")) == len(bad), "dead letters")
        Maintenance(sqlite_engine, transport, keys).tick()  # dispatches the real step
        until(lambda: finished(sqlite_engine, wid), "the real step to run")
        transport.add(stream, {"v": "1"})
        until(lambda: len(evidence(sqlite_engine, "dead_letter")) == len(bad) + 1, "one more")
        assert thread.is_alive()

    rows = evidence(sqlite_engine, "dead_letter")
    assert {r.kind for r in rows} == {"delivery"}
    dead = entries(transport, keys.dead_letter)
    assert len(dead) == len(bad) + 1
    assert {f["dl_group"] for _, f in dead} == {keys.workers_group}
    assert transport.pending_summary(stream, keys.workers_group).count == 0
    assert runs(perform_log) == Counter({(wid, "a", 1): 1})


# -- poison: delivered too many times -----------------------------------------------------------


def test_a_completion_delivered_too_often_is_dead_lettered_and_recorded(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    poison_wf, poison = completed_event(sqlite_engine, "poison")
    other_wf, other = completed_event(sqlite_engine, "other")
    stream, group = keys.completions, keys.completion_group
    transport.ensure_group(stream, group)
    poison_id = transport.add(stream, poison)
    other_id = transport.add(stream, other)
    # Consumers that read and died before acknowledging: the poison entry twice over.
    crashed = connect(None)
    assert len(crashed.read_group(group, "crashed-1", [stream], 10, 0)) == 2
    [again] = crashed.autoclaim(stream, group, "crashed-2", 0, 1).claimed
    assert (again.entry.id, again.deliveries) == (poison_id, 2)

    consumer = CompletionConsumer(
        sqlite_engine,
        transport,
        keys,
        ConsumerConfig(name="survivor", claim_idle_ms=0, max_deliveries=2),
    )
    consumer.take_over_idle()

    # The third delivery of the poison entry is one too many: moved aside, recorded.
    [(_, dead)] = entries(transport, keys.dead_letter)
    assert (dead["dl_id"], dead["dl_deliveries"], dead["dl_stream"]) == (poison_id, "3", stream)
    assert dead["dl_reason"] == "delivered too many times"
    [row] = evidence(sqlite_engine, "dead_letter")
    assert (row.workflow_id, row.step, row.kind) == (poison_wf, "a", "event")
    assert (row.payload["id"], row.payload["deliveries"]) == (poison_id, 3)
    # The other entry, at its second delivery, was taken over and consumed normally.
    consumed = evidence(sqlite_engine, "consumed")
    assert [r.workflow_id for r in consumed] == [other_wf]
    assert transport.pending_summary(stream, group).count == 0
    assert other_id not in {f["dl_id"] for _, f in entries(transport, keys.dead_letter)}
    assert consumer.stats.dead_lettered == 1


# -- a publish lost after the ledger committed ----------------------------------------------------


def test_a_failed_publish_after_a_worker_commit_goes_back_to_the_dispatcher(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = (
        Workflow.new("publish", {"log": str(perform_log)})
        .add("root", app.Echo.new())
        .add("c1", app.Echo.new(), deps=["root"])
        .add("c2", app.Echo.new(), deps=["root"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    dispatcher = Maintenance(sqlite_engine, transport, keys)
    dispatcher.tick()
    assert dispatcher.stats.dispatched == 1
    flaky = FlakyTransport(transport)
    flaky.fail.update({"add_many": 1, "add": 1})  # the children's ready messages, the event
    # Without hand-off, so both children go through the ready stream's publish.
    worker = worker_for(sqlite_engine, flaky, keys, hand_off=False)
    stream = keys.ready("default")
    with running(worker.run):
        until(lambda: flaky.failed == Counter({"add_many": 1, "add": 1}), "both publishes to fail")
        # The outcome stands; the released children were handed back, undispatched.
        assert step_row(sqlite_engine, wid, "root").state == "completed"
        for child in ("c1", "c2"):
            row = step_row(sqlite_engine, wid, child)
            assert (row.state, row.dispatched_at) == ("available", None)
        assert [decode_ready(f).step for _, f in entries(transport, stream)] == ["root"]

        dispatcher.tick()  # the next pass sends them
        assert dispatcher.stats.dispatched == 3
        until(lambda: finished(sqlite_engine, wid), "the children to run")

    assert Workflow.get(sqlite_engine, wid).outcome == "completed"
    assert runs(perform_log) == Counter({(wid, s, 1): 1 for s in ("root", "c1", "c2")})


def test_a_failed_publish_by_the_dispatcher_is_sent_on_its_next_tick(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    wid = Workflow.insert(Workflow.new("tick").add("a", Noop.new()), sqlite_engine).id
    flaky = FlakyTransport(transport)
    flaky.fail["add"] = 1
    dispatcher = Maintenance(sqlite_engine, flaky, keys)
    stream = keys.ready("default")

    dispatcher.tick()
    assert flaky.failed["add"] == 1
    assert step_row(sqlite_engine, wid, "a").dispatched_at is None
    assert entries(transport, stream) == []

    dispatcher.tick()
    assert step_row(sqlite_engine, wid, "a").dispatched_at is not None
    [(_, fields)] = entries(transport, stream)
    assert (decode_ready(fields).workflow_id, decode_ready(fields).step) == (wid, "a")


# -- retries ----------------------------------------------------------------------------------


def test_tick_promotes_due_retries_and_dispatches_them(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    wf = Workflow.new("retries").add("due", Noop.new()).add("later", Noop.new())
    wid = Workflow.insert(wf, sqlite_engine).id
    dispatcher = Maintenance(sqlite_engine, transport, keys)
    dispatcher.tick()
    now = utcnow()

    def fail_once(conn: Connection, name: str, retry_at: datetime) -> None:
        claim = claim_step(conn, wid, name, owner="w", lease_seconds=30, now=now)
        assert isinstance(claim, Claim) and claim.attempt == 1
        complete_step(
            conn, wid, name, "retryable", {"error": "boom"}, attempt=1, now=now, retry_at=retry_at
        )

    with sqlite_engine.begin() as conn:
        fail_once(conn, "due", now - timedelta(seconds=1))
        fail_once(conn, "later", now + timedelta(hours=1))
    stream = keys.ready("default")
    sent_before = len(entries(transport, stream))

    dispatcher.tick(promote=False)  # a pass a commit's notification woke: no retries
    assert len(entries(transport, stream)) == sent_before
    assert dispatcher.stats.retries_promoted == 0

    dispatcher.tick()

    new = [decode_ready(f) for _, f in entries(transport, stream)[sent_before:]]
    assert [(m.workflow_id, m.step) for m in new] == [(wid, "due")]
    assert dispatcher.stats.retries_promoted == 1
    assert step_row(sqlite_engine, wid, "due").state == "available"
    assert step_row(sqlite_engine, wid, "due").dispatched_at is not None
    assert step_row(sqlite_engine, wid, "later").state == "retryable"
    assert Workflow.get(sqlite_engine, wid).counters.as_dict() == recount(sqlite_engine, wid)


# -- duplicate ready messages ----------------------------------------------------------------------


def test_duplicate_ready_entries_are_acknowledged_and_the_step_runs_once(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = Workflow.new("dups", {"log": str(perform_log)}).add("a", app.Echo.new())
    wid = Workflow.insert(wf, sqlite_engine).id
    Maintenance(sqlite_engine, transport, keys).tick()
    stream = keys.ready("default")
    [(_, fields)] = entries(transport, stream)
    for _ in range(3):
        transport.add(stream, fields)
    worker = worker_for(sqlite_engine, transport, keys, concurrency=4)
    refused = ("duplicate", "late")
    with running(worker.run):
        until(lambda: finished(sqlite_engine, wid), "the step to run")
        until(
            lambda: sum(len(evidence(sqlite_engine, c)) for c in refused) == 3,
            "three refused deliveries recorded",
        )
        until(
            lambda: transport.pending_summary(stream, keys.workers_group).count == 0,
            "every delivery acknowledged",
        )
    assert runs(perform_log) == Counter({(wid, "a", 1): 1})
    assert worker.stats.claimed == 1
    rows = [r for c in refused for r in evidence(sqlite_engine, c)]
    assert {(r.workflow_id, r.step, r.kind) for r in rows} == {(wid, "a", "delivery")}


def test_the_worker_runs_steps_on_a_fixed_set_of_threads(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    """A thread per ready entry cost a thread start each (about 0.1 ms of CPU): the
    worker keeps one step thread per step it may hold (`in_flight`) and hands each entry
    to a free one."""
    ids = [
        Workflow.insert(
            Workflow.new("threads", {"log": str(perform_log)}).add("a", app.CountsItsThread.new()),
            sqlite_engine,
        ).id
        for _ in range(12)
    ]
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys, concurrency=2, in_flight=3)
    with running(worker.run):
        until(lambda: all(finished(sqlite_engine, wid) for wid in ids), "every workflow")
    notes = app.perform_log(perform_log)
    assert len(notes) == 12
    assert len({n["thread"] for n in notes}) <= 3
    assert max(n["thread_steps"] for n in notes) > 1, "every step ran on a new thread"


def gated_workflows(engine: Engine, log: Path, n: int) -> list[str]:
    app.Gated.reset()
    return [
        Workflow.insert(
            Workflow.new("gated", {"log": str(log)}).add("a", app.Gated.new()), engine
        ).id
        for _ in range(n)
    ]


def states(engine: Engine, ids: Sequence[str]) -> Counter[str]:
    s = t.steps
    with engine.connect() as conn:
        rows = conn.execute(select(s.c.state).where(s.c.workflow_id.in_(ids))).all()
    return Counter(r.state for r in rows)


def test_concurrency_bounds_the_steps_performing_while_more_are_claimed_in_flight(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    """`concurrency` steps perform at once; up to `in_flight` are claimed, so the ledger's
    round trips for the next steps overlap the running ones instead of taking slots."""
    ids = gated_workflows(sqlite_engine, perform_log, 6)
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys, concurrency=2, in_flight=5)
    with running(worker.run):
        until(lambda: states(sqlite_engine, ids)["executing"] == 5, "five steps claimed")
        until(lambda: app.Gated.performing == 2, "two steps performing")
        assert states(sqlite_engine, ids)["executing"] == 5, "a sixth claim beyond in_flight"
        app.Gated.GATE.set()
        until(lambda: all(finished(sqlite_engine, wid) for wid in ids), "every workflow")
    assert app.Gated.peak == 2
    assert len(app.perform_log(perform_log)) == 6


def test_a_claimed_step_still_waiting_for_a_slot_at_the_drain_is_released_not_run(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    ids = gated_workflows(sqlite_engine, perform_log, 3)
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(
        sqlite_engine, transport, keys, concurrency=1, in_flight=3, drain_seconds=0.2
    )
    with running(worker.run):
        until(lambda: states(sqlite_engine, ids)["executing"] == 3, "three steps claimed")
        until(lambda: app.Gated.performing == 1, "one step performing")
    # The drain gave up: it asked the performing step to stop and released every claim.
    # The two steps waiting for the slot never ran. The performing one returns as soon
    # as it is asked to stop, so its outcome races its release: whichever lands first
    # wins, and the other changes nothing.
    until(lambda: not worker._in_flight(), "every step thread done")
    [performed] = app.perform_log(perform_log)
    waiting = [wid for wid in ids if wid != performed["wf"]]
    assert states(sqlite_engine, waiting) == Counter({"available": 2})
    assert states(sqlite_engine, [performed["wf"]]) in (
        Counter({"available": 1}),
        Counter({"completed": 1}),
    )
    assert worker.stats.released_on_drain >= 2
    assert worker.stats.released_on_drain + worker.stats.completed == 3


def test_a_step_that_exits_does_not_take_its_thread_with_it(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    """One step thread: a step raising SystemExit must leave it serving the next entry."""
    exits = Workflow.new("exits", {"log": str(perform_log)}).add("a", app.Exits.new())
    fine = Workflow.new("fine", {"log": str(perform_log)}).add("a", app.Echo.new())
    Workflow.insert(exits, sqlite_engine)
    wid = Workflow.insert(fine, sqlite_engine).id
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys, concurrency=1, in_flight=1)
    with running(worker.run):
        until(lambda: finished(sqlite_engine, wid), "the second workflow, after the exit")


# -- bugs these tests found, fixed: each pins the right behaviour -------------------------------


def test_a_failing_ack_neither_holds_the_step_back_nor_runs_it_twice(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    # Found by this suite: the worker used to retry the ready entry's ack (for up to
    # 120 s) after its claim committed and before registering the claim for lease
    # renewal, so a Redis outage longer than the lease let the rescue start attempt 2
    # while attempt 1 was still about to run. The ack is now tried once, after the
    # claim is registered; an unacknowledged entry is harmless (the ledger has the claim).
    wf = Workflow.new("lease", {"log": str(perform_log)}).add("a", app.Echo.new())
    wid = Workflow.insert(wf, sqlite_engine).id
    dispatcher = Maintenance(sqlite_engine, transport, keys)
    dispatcher.tick()
    flaky = FlakyTransport(transport)
    flaky.down.add("ack")  # Redis refuses the acknowledgement
    worker = worker_for(sqlite_engine, flaky, keys, lease_seconds=0.5)
    with running(worker.run):
        until(lambda: finished(sqlite_engine, wid), "the workflow to finish")
        assert flaky.failed["ack"] >= 1
    assert step_row(sqlite_engine, wid, "a").attempt == 1
    assert runs(perform_log) == Counter({(wid, "a", 1): 1})


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_component_that_dies_is_logged_with_its_exception() -> None:
    def dies(stop: threading.Event) -> None:
        raise RuntimeError("the reason it died")

    runner = Runner()
    runner.add("doomed", dies)
    handler = _Records()
    logger = logging.getLogger("streamflow")
    logger.addHandler(handler)
    try:
        runner.start()
        assert runner.join(10)
    finally:
        logger.removeHandler(handler)
    assert runner.failed == ["doomed"] and runner.stop.is_set()
    [record] = [r for r in handler.records if r.getMessage() == "process.component_failed"]
    assert "the reason it died" in JsonLineFormatter().format(record)


# -- hand-off: a released child runs next on its parent's thread --------------------------------


def test_a_chain_is_handed_from_parent_to_child_without_ready_messages(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = (
        Workflow.new("chain", {"log": str(perform_log)})
        .add("a", app.Echo.new())
        .add("b", app.Echo.new(), deps=["a"])
        .add("c", app.Echo.new(), deps=["b"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys)
    with running(worker.run):
        until(lambda: finished(sqlite_engine, wid), "the chain to finish")
    assert runs(perform_log) == Counter({(wid, s, 1): 1 for s in "abc"})
    # Only the root went through the ready stream; b and c were claimed by their parent's
    # outcome transaction and leave no duplicate or replayed evidence behind.
    assert [decode_ready(f).step for _, f in entries(transport, keys.ready("default"))] == ["a"]
    assert worker.stats.handed_off == 2
    assert evidence(sqlite_engine, "duplicate") == evidence(sqlite_engine, "replayed") == []
    assert Workflow.get(sqlite_engine, wid).outcome == "completed"


def test_hand_off_takes_one_child_of_a_served_queue_and_publishes_the_rest(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = (
        Workflow.new("fan", {"log": str(perform_log)})
        .add("root", app.Echo.new())
        .add("c1", app.Echo.new(), deps=["root"])
        .add("c2", app.Echo.new(), deps=["root"])
        .add("elsewhere", app.Echo.new(queue="other"), deps=["root"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys)
    with running(worker.run):
        until(
            lambda: (
                step_row(sqlite_engine, wid, "c1").state == "completed"
                and step_row(sqlite_engine, wid, "c2").state == "completed"
            ),
            "both default-queue children to run",
        )
    assert worker.stats.handed_off == 1
    published = [decode_ready(f).step for _, f in entries(transport, keys.ready("default"))]
    assert published[0] == "root" and len(published) == 2 and published[1] in ("c1", "c2")
    # A queue this worker does not serve is never handed to it.
    assert [decode_ready(f).step for _, f in entries(transport, keys.ready("other"))] == [
        "elsewhere"
    ]
    assert step_row(sqlite_engine, wid, "elsewhere").state == "available"


def test_no_hand_off_when_it_is_switched_off(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys, perform_log: Path
) -> None:
    wf = (
        Workflow.new("chain", {"log": str(perform_log)})
        .add("a", app.Echo.new())
        .add("b", app.Echo.new(), deps=["a"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    Maintenance(sqlite_engine, transport, keys).tick()
    worker = worker_for(sqlite_engine, transport, keys, hand_off=False)
    with running(worker.run):
        until(lambda: finished(sqlite_engine, wid), "the chain to finish")
    assert worker.stats.handed_off == 0
    assert [decode_ready(f).step for _, f in entries(transport, keys.ready("default"))] == [
        "a",
        "b",
    ]


def test_a_lingering_consumer_reads_once_what_arrived_meanwhile(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    """Events trickling in during the linger are taken by one read at its end, not by
    a read per arrival: the batch costs the same round trips however they trickled."""
    consumer = CompletionConsumer(
        sqlite_engine, transport, keys, ConsumerConfig(name="c1", linger_ms=200)
    )
    stream = keys.completions
    transport.ensure_group(stream, keys.completion_group)
    reads: list[int] = []
    real_read = transport.read_group

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        reads.append(1)
        return real_read(*args, **kwargs)

    class Trickle(threading.Event):
        """The linger's wait, during which five events arrive one by one."""

        def wait(self, timeout: float | None = None) -> bool:
            for i in range(5):
                transport.add(stream, {"n": str(i)})
            return False

    transport.read_group = counted  # type: ignore[method-assign]
    got = consumer._linger([stream], 50, Trickle())
    assert [e.fields["n"] for e in got] == ["0", "1", "2", "3", "4"]
    assert len(reads) == 1


def test_a_stop_cuts_the_linger_short(
    sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    consumer = CompletionConsumer(
        sqlite_engine, transport, keys, ConsumerConfig(name="c1", linger_ms=60_000)
    )
    transport.ensure_group(keys.completions, keys.completion_group)
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    assert consumer._linger([keys.completions], 10, stop) == []
    assert time.monotonic() - started < 30  # not the minute it would otherwise wait
