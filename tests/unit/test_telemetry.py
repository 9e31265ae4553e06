"""Telemetry: the attach API, the allow-list, and the events a real in-process run emits.

The allow-list test runs workflows through the whole engine (worker, completion consumer,
dispatcher and reconciler in threads, on SQLite and the in-process stream) so that every
event is emitted — retries, terminal failures, cascades, a step cancelling itself, evidence,
and reconciler repairs — and then checks every metadata key and value it saw. Strict mode
is on throughout: an emitter passing a key outside the allow-list raises, and is recorded
in `telemetry.violations()`, which must stay empty.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select

from ledger import tables as t
from ledger.claims import Claim, claim_step
from ledger.db import transaction
from streamflow import Dep, Workflow, telemetry
from streamflow.engine.common import now_ms, utcnow
from streamflow.engine.launch import EngineOptions, build_runner
from streamflow.metrics import OTHER, PrometheusExporter, counter_name
from streamflow.streams import ReadyMessage, RedisTransport, StreamKeys, encode
from streamflow.telemetry import ALLOWED_METADATA, EVENTS, Event, TelemetryViolation
from tests import engine_app as app
from tests.workers import Noop

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Recorder:
    events: list[tuple[str, dict[str, float], dict[str, str | int]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self, event: str, measurements: dict[str, float], metadata: dict[str, str | int]
    ) -> None:
        with self.lock:
            self.events.append((event, measurements, metadata))

    def of(self, event: Event, **meta: str | int) -> list[tuple[dict[str, float], dict[str, Any]]]:
        with self.lock:
            return [
                (m, md)
                for e, m, md in self.events
                if e == event.value and all(md.get(k) == v for k, v in meta.items())
            ]

    def names(self) -> set[str]:
        with self.lock:
            return {e for e, _, _ in self.events}


@pytest.fixture
def strict() -> Iterator[None]:
    old = telemetry.set_strict(True)
    telemetry.clear_violations()
    yield
    telemetry.set_strict(old)
    telemetry.clear_violations()


@pytest.fixture
def recorder(strict: None) -> Iterator[Recorder]:
    rec = Recorder()
    handle = telemetry.attach(rec)
    yield rec
    telemetry.detach(handle)


def suffix() -> str:
    return uuid.uuid4().hex[:6]


# -- the API ---------------------------------------------------------------------------------


def test_attach_and_detach(strict: None) -> None:
    rec = Recorder()
    assert not telemetry.enabled()
    handle = telemetry.attach(rec)
    assert telemetry.enabled()
    telemetry.emit(Event.REPAIRED, {"count": 2}, {"repair": "release", "source": "reconciler"})
    assert telemetry.detach(handle)
    assert not telemetry.detach(handle)
    assert not telemetry.enabled()
    telemetry.emit(Event.REPAIRED, {"count": 1}, {"repair": "release", "source": "reconciler"})
    assert rec.events == [
        (
            "streamflow.workflow.repaired",
            {"count": 2.0},
            {"repair": "release", "source": "reconciler"},
        )
    ]


def test_a_handler_that_raises_is_logged_once_and_the_others_still_run(
    strict: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: str, measurements: dict[str, float], metadata: dict[str, str | int]) -> None:
        raise RuntimeError("handler bug")

    rec = Recorder()
    handles = [telemetry.attach(broken), telemetry.attach(rec)]
    try:
        with caplog.at_level("ERROR", logger="streamflow"):
            for _ in range(3):
                telemetry.emit(Event.REPAIRED, {"count": 1}, {"repair": "retry_due"})
    finally:
        for h in handles:
            telemetry.detach(h)
    assert len(rec.events) == 3
    assert handles[0].failures == 3
    failures = [r for r in caplog.records if r.getMessage() == "telemetry.handler_failed"]
    assert len(failures) == 1


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"workflow_id": "0190f2c3a1b2c3d4e5f60718293a4b5c"}, "not in the allow-list"),
        ({"step": "fetch"}, "not in the allow-list"),
        ({"args": "{'account_id': 42}"}, "not in the allow-list"),
        ({"payload": "secret"}, "not in the allow-list"),
        ({"outcome": "completed"}, "not for this event"),
        ({"status": "exploded"}, "closed set"),
        ({"source": True}, "closed set"),
        ({"source": "consumer:host-1"}, "closed set"),
        ({"workflow_name": "0190f2c3a1b2c3d4e5f60718293a4b5c"}, "looks like a workflow id"),
        ({"queue": 7}, "not a non-empty string"),
    ],
)
def test_emitting_outside_the_allow_list_fails_in_strict_mode(
    recorder: Recorder, metadata: dict[str, str | int], problem: str
) -> None:
    with pytest.raises(TelemetryViolation, match=problem):
        telemetry.emit(Event.STEP_COMPLETED, {"count": 1}, metadata)
    assert recorder.events == []
    assert telemetry.violations()


def test_outside_strict_mode_the_key_is_dropped_with_one_warning(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry.set_strict(False)
    with caplog.at_level("WARNING", logger="streamflow"):
        for _ in range(2):
            telemetry.emit(
                Event.STEP_COMPLETED,
                {"count": 1, "payload_size": 3},
                {"workflow_name": "sync", "workflow_id": "abc", "status": "completed"},
            )
    assert [md for _, _, md in recorder.events] == [
        {"workflow_name": "sync", "status": "completed"}
    ] * 2
    assert [m for _, m, _ in recorder.events] == [{"count": 1.0}] * 2
    dropped = [r for r in caplog.records if r.getMessage() == "telemetry.metadata_dropped"]
    assert len(dropped) == 2  # one per (event, key), not one per emit
    assert {k for _, k, _ in telemetry.violations()} == {"workflow_id", "payload_size"}


def test_long_names_are_capped(recorder: Recorder) -> None:
    telemetry.emit(Event.INSERTED, {"count": 1}, {"workflow_name": "n" * 500})
    assert recorder.events[0][2]["workflow_name"] == "n" * telemetry.MAX_NAME_CHARS


def test_every_event_keys_come_from_the_allow_list() -> None:
    assert set(EVENTS) == set(Event)
    for spec in EVENTS.values():
        assert spec.metadata <= set(ALLOWED_METADATA)
        assert spec.measurements <= telemetry.ALLOWED_MEASUREMENTS
    forbidden = {"workflow_id", "id", "step", "step_name", "args", "payload", "context", "error"}
    assert not forbidden & set(ALLOWED_METADATA)


def test_nothing_attached_costs_no_ledger_read(sqlite_engine: Engine) -> None:
    wid = Workflow.insert(Workflow.new("cheap").add("a", Noop.new()), sqlite_engine).id
    result = Workflow.complete_step(sqlite_engine, wid, "a", status="completed")
    # With no handler the helpers return before touching the repo (here: not a repo).
    telemetry.completion_recorded(object(), result, source="api")  # type: ignore[arg-type]


# -- events from the API ------------------------------------------------------------------------


def test_insert_and_complete_step_emit_from_the_ledger_result(
    recorder: Recorder, sqlite_engine: Engine
) -> None:
    name = f"api-{suffix()}"
    wf = (
        Workflow.new(name)
        .add("a", Noop.new())
        .add("b", Noop.new(), deps=["a"])
        .add("c", app.Echo.new(queue="emails"), deps=[Dep("a", policy="continue")])
        .add("d", Noop.new(), deps=["b"])
    )
    wid = Workflow.insert(wf, sqlite_engine).id
    Workflow.complete_step(sqlite_engine, wid, "a", status="failed", payload={"error": "x"})
    Workflow.complete_step(sqlite_engine, wid, "c", status="completed", payload={"ok": 1})
    Workflow.complete_step(sqlite_engine, wid, "c", status="completed", payload={"ok": 1})
    Workflow.complete_step(sqlite_engine, wid, "c", status="completed", payload={"ok": 2})

    names = [e.removeprefix("streamflow.workflow.") for e, _, _ in recorder.events]
    assert names == [
        "inserted",
        "step_failed",
        "step_released",
        "cascade_cancelled",
        "step_completed",
        "workflow_finished",
        "evidence_recorded",
        "evidence_recorded",
    ]
    [(m, md)] = recorder.of(Event.INSERTED)
    assert m == {"count": 1, "steps": 4, "roots": 1}
    assert md == {"workflow_name": name, "source": "api", "semantics_version": 2}
    [(m, md)] = recorder.of(Event.STEP_FAILED)
    assert md == {
        "workflow_name": name,
        "queue": "default",
        "status": "failed",
        "terminal_cause": "failed",
        "source": "api",
    }
    assert m == {"count": 1, "attempt": 1}
    [(_, md)] = recorder.of(Event.STEP_RELEASED)
    assert md["queue"] == "emails"
    [(m, md)] = recorder.of(Event.CASCADE_CANCELLED)
    assert m == {"count": 2}  # b, and d through it
    assert md["terminal_cause"] == "cancelled_by_dependency"
    [(m, md)] = recorder.of(Event.WORKFLOW_FINISHED)
    assert md == {"workflow_name": name, "outcome": "failed", "source": "api"}
    assert m["workflow_duration_ms"] >= 0
    evidence = [md["classification"] for _, md in recorder.of(Event.EVIDENCE_RECORDED)]
    assert evidence == ["duplicate", "ambiguous"]
    assert telemetry.violations() == set()


def test_a_retryable_outcome_is_step_failed_with_status_retryable(
    recorder: Recorder, sqlite_engine: Engine
) -> None:
    wid = Workflow.insert(Workflow.new("retry").add("a", Noop.new()), sqlite_engine).id
    Workflow.complete_step(sqlite_engine, wid, "a", status="retryable", payload={"e": 1})
    [(m, md)] = recorder.of(Event.STEP_FAILED)
    assert md["status"] == "retryable" and "terminal_cause" not in md
    assert m["attempt"] == 1


def test_cancel_recorded_reports_the_cancelled_steps_and_the_finish(
    recorder: Recorder, sqlite_engine: Engine
) -> None:
    name = f"cancel-{suffix()}"
    wid = Workflow.insert(Workflow.new(name).add("a", Noop.new()), sqlite_engine).id
    telemetry.cancel_recorded(
        sqlite_engine, wid, cancelled_steps=3, workflow_outcome="cancelled", applied=True
    )
    telemetry.cancel_recorded(
        sqlite_engine, wid, cancelled_steps=0, workflow_outcome="cancelled", applied=False
    )
    [(m, md)] = recorder.of(Event.STEP_CANCELLED)
    assert m == {"count": 3}
    assert md["terminal_cause"] == "workflow_cancelled" and md["workflow_name"] == name
    [(_, md)] = recorder.of(Event.WORKFLOW_FINISHED)
    assert md == {"workflow_name": name, "outcome": "cancelled", "source": "api"}


# -- the allow-list, on a real run -----------------------------------------------------------------


def _strings(value: Any) -> set[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        out = set(value)
        for v in value.values():
            out |= _strings(v)
        return out
    if isinstance(value, list | tuple):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def _user_data(engine: Engine, workflow_ids: list[str]) -> set[str]:
    """Ids, step names, args, context and every stored payload of these workflows."""
    found = set(workflow_ids)
    with engine.connect() as conn:
        for wid in workflow_ids:
            w = conn.execute(select(t.workflows.c.context).where(t.workflows.c.id == wid)).one()
            found |= _strings(w.context)
            for row in conn.execute(
                select(t.steps.c.name, t.steps.c.args, t.steps.c.lease_owner).where(
                    t.steps.c.workflow_id == wid
                )
            ):
                found |= {row.name} | _strings(row.args)
                if row.lease_owner:
                    found.add(row.lease_owner)
            for table in (t.attempts, t.results, t.evidence):
                for (payload,) in conn.execute(
                    select(table.c.payload).where(table.c.workflow_id == wid)
                ):
                    found |= _strings(payload)
    return found


def test_allow_list_holds_for_every_event_of_a_real_run(
    recorder: Recorder, sqlite_engine: Engine, transport: RedisTransport, keys: StreamKeys
) -> None:
    engine = sqlite_engine
    tag = suffix()
    main_name, ghost_name, orphan_name = f"tele-main-{tag}", f"tele-ghost-{tag}", f"tele-orph-{tag}"
    main = (
        Workflow.new(main_name, {"tenant": "ctx-secret-7"})
        .add("fetch", app.Echo.new({"secret": "arg-secret-1", "n": 41}))
        .add("flaky", app.FailsUntil.new({"succeed_on": 2}), deps=["fetch"])
        .add("bill", app.Echo.new({"customer": Workflow.result("fetch")}), deps=["fetch", "flaky"])
        .add("boom", app.Explode.new({"why": "arg-secret-2"}), deps=["fetch"])
        .add("after_boom", app.Echo.new(), deps=["boom"])
        .add("tidy", app.Echo.new(), deps=[Dep("boom", policy="continue")])
        .add("quit", app.CancelsItself.new(), deps=["fetch"])
    )
    # Claimed below by a worker that "dies": its lease expires and the reconciler rescues it.
    ghost = (
        Workflow.new(ghost_name)
        .add("haunt", app.Echo.new({"g": "arg-secret-3"}, queue="ghost", max_attempts=1))
        .add("haunt_child", app.Echo.new(), deps=["haunt"])
    )
    # On a queue no worker reads: dispatched, never claimed, so dispatched again.
    orphan = Workflow.new(orphan_name).add("lonely", app.Echo.new(queue="orphan"))

    options = EngineOptions(
        queues=("default",),
        concurrency=4,
        consumer=True,
        maintenance=True,
        reconcile_every=0.2,
        redispatch_after_seconds=0.3,
        drain_seconds=5.0,
    )
    runner, _ = build_runner(engine, transport, keys, options)
    runner.start()
    try:
        wids = [Workflow.insert(wf, engine).id for wf in (main, ghost, orphan)]
        main_id, ghost_id, _ = wids

        def ghost_claim(conn: Any) -> Any:
            return claim_step(
                conn, ghost_id, "haunt", owner="ghost-owner", lease_seconds=0.01, now=utcnow()
            )

        with transaction(engine) as conn:
            assert isinstance(ghost_claim(conn), Claim)

        until(lambda: Workflow.get(engine, main_id).finished, "the main workflow to finish")
        until(lambda: Workflow.get(engine, ghost_id).finished, "the ghost workflow to finish")
        until(lambda: recorder.of(Event.REPAIRED, repair="redispatch"), "a redispatch repair")
        # A ready message for a step long completed: the worker refuses it (late delivery).
        transport.add(
            keys.ready("default"), encode(ReadyMessage(main_id, "fetch", "default", now_ms()))
        )
        until(
            lambda: recorder.of(Event.EVIDENCE_RECORDED, kind="delivery", state="completed"),
            "a refused delivery",
        )
        until(
            lambda: recorder.of(Event.EVIDENCE_RECORDED, kind="event", classification="consumed"),
            "a consumed completion event",
        )
    finally:
        runner.stop.set()
        assert runner.join(20), "the engine did not stop"
    assert runner.failed == []

    fetched = Workflow.results(engine, main_id)["fetch"]
    Workflow.complete_step(engine, main_id, "fetch", status="completed", payload=fetched)
    Workflow.complete_step(engine, main_id, "fetch", status="completed", payload={"x": "p-9"})
    # A signal nobody awaits: recorded as unmatched; its name and payload stay out.
    signalled = Workflow.signal(engine, main_id, "sig-name-secret", {"s": "sig-secret-5"})
    assert signalled.classification == "unmatched"

    # Every event was emitted.
    expected = {e.value for e in Event}
    assert recorder.names() == expected
    assert telemetry.violations() == set()

    # The shapes that matter, from the run.
    assert {md["status"] for _, md in recorder.of(Event.STEP_FAILED, workflow_name=main_name)} == {
        "retryable",
        "failed",
    }
    [(_, md)] = recorder.of(Event.STEP_FAILED, workflow_name=ghost_name)
    assert md["source"] == "reconciler" and md["terminal_cause"] == "attempts_exhausted"
    assert recorder.of(Event.REPAIRED, repair="lease_expired", source="reconciler")
    assert recorder.of(Event.STEP_CANCELLED, workflow_name=main_name, source="worker")
    [(m, _)] = recorder.of(Event.CASCADE_CANCELLED, workflow_name=main_name)
    assert m["count"] == 1
    started = recorder.of(Event.STEP_STARTED, workflow_name=main_name)
    assert len(started) == 7  # six steps, flaky twice; after_boom never ran
    assert all(m["queue_wait_ms"] >= 0 for m, _ in started)
    # A step handed straight from its parent's worker had no ready message, so no ready
    # hop; every other start measures one.
    hops = [m["ready_hop_ms"] for m, _ in started if "ready_hop_ms" in m]
    assert hops and all(hop >= 0 for hop in hops)
    done = recorder.of(Event.STEP_COMPLETED, workflow_name=main_name, source="worker")
    assert len(done) == 4 and all(m["duration_ms"] >= 0 for m, _ in done)
    assert {md["outcome"] for _, md in recorder.of(Event.WORKFLOW_FINISHED)} == {"failed"}
    evidence = {md["classification"] for _, md in recorder.of(Event.EVIDENCE_RECORDED)}
    assert {"consumed", "late", "duplicate", "ambiguous"} <= evidence

    # THE ALLOW-LIST: keys from the list (and the event's own), values from closed sets,
    # and nothing that is an id, a step name, args, context or a payload.
    forbidden = _user_data(engine, wids) | {"sig-name-secret", "sig-secret-5"}
    assert {"arg-secret-1", "ctx-secret-7", "fetch", "ghost-owner", "p-9", main_id} <= forbidden
    for event, measurements, metadata in recorder.events:
        spec = EVENTS[Event(event)]
        assert set(metadata) <= spec.metadata, (event, metadata)
        assert set(measurements) <= spec.measurements, (event, measurements)
        for key, value in metadata.items():
            allowed = ALLOWED_METADATA[key]
            if allowed is not None:
                assert value in allowed, (event, key, value)
            assert value not in forbidden, (event, key, value)
            assert not any(wid in str(value) for wid in wids), (event, key, value)


# -- the Prometheus exporter, in-process ----------------------------------------------------------


def test_exporter_counts_events_and_caps_open_labels(strict: None, sqlite_engine: Engine) -> None:
    exporter = PrometheusExporter(max_label_values=1).attach()
    try:
        for name in ("first-name", "second-name"):
            wid = Workflow.insert(Workflow.new(name).add("a", Noop.new()), sqlite_engine).id
            Workflow.complete_step(sqlite_engine, wid, "a", status="completed")
    finally:
        exporter.detach()
    text = generate_latest(exporter.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    inserted = counter_name(Event.INSERTED)
    assert (
        samples[
            (
                inserted,
                (("semantics_version", "2"), ("source", "api"), ("workflow_name", "first-name")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (inserted, (("semantics_version", "2"), ("source", "api"), ("workflow_name", OTHER)))
        ]
        == 1
    )
    finished = [
        labels for (n, labels), v in samples.items() if n == counter_name(Event.WORKFLOW_FINISHED)
    ]
    assert len(finished) == 2
    assert any(n == "streamflow_workflow_duration_seconds_count" for n, _ in samples)


def test_the_cli_and_the_dashboard_are_allowed_sources() -> None:
    # `streamflow signal` reports source="cli"; it was once missing from the allow-list, so
    # the event lost its source and a violation was recorded.
    telemetry.violations()  # drain earlier tests' state
    recorded: list[tuple[object, object, object]] = []
    handle = telemetry.attach(lambda e, m, md: recorded.append((e, m, md)))
    try:
        for source in ("cli", "dashboard"):
            telemetry.signal_recorded(workflow_name="w", classification="consumed", source=source)
    finally:
        telemetry.detach(handle)
    assert [md["source"] for _, _, md in recorded] == ["cli", "dashboard"]  # type: ignore[index]
