"""Public workflow telemetry: `streamflow.workflow.*` events with bounded metadata only.

```python
from streamflow import telemetry

def on_event(event: str, measurements: dict[str, float], metadata: dict[str, str | int]) -> None:
    if event == "streamflow.workflow.step_completed":
        statsd.timing("step", measurements.get("duration_ms", 0), tags=metadata)

handle = telemetry.attach(on_event)
...
telemetry.detach(handle)
```

Metadata is an allow-list (`ALLOWED_METADATA`): every key's values come from a closed set
(`workflow_name` and `queue` are closed in practice: names fixed in code and queues
configured by the operator; both are capped in length). Ids, step names, args and payloads
are never metadata. Each event declares the keys and measurements it may carry
(`EVENTS`); `emit` checks every call against that. A violation raises
`TelemetryViolation` in strict mode (tests: `set_strict(True)` or
`STREAMFLOW_TELEMETRY_STRICT=1`) and otherwise drops the offending key with one logged
warning per event and key, so a telemetry mistake can never stop the engine.

A handler that raises is logged once and kept attached; the engine carries on. Emitting
costs one truthiness check when nothing is attached: emitters call `enabled()` (or the
helpers below, which do) before building anything.

The docs are docs/telemetry.md; keep its tables in step with `EVENTS` and the sets here.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, ParamSpec

from sqlalchemy import select

from ledger import tables as t
from ledger.blockers import Blocker
from ledger.db import Repo, read
from ledger.model import CompletionResult, WorkflowDefinition
from ledger.rules import SEMANTICS_VERSION, CompletionStatus, StepState
from streamflow.logs import log_event

PREFIX: Final = "streamflow.workflow."

Metadata = dict[str, str | int]
Measurements = dict[str, float]
Handler = Callable[[str, Measurements, Metadata], None]


class Event(enum.StrEnum):
    """Every event Streamflow emits, by full name."""

    INSERTED = PREFIX + "inserted"
    STEP_RELEASED = PREFIX + "step_released"
    STEP_STARTED = PREFIX + "step_started"
    STEP_COMPLETED = PREFIX + "step_completed"
    #: An attempt failed: status=retryable (another attempt is scheduled) or
    #: status=failed (terminal).
    STEP_FAILED = PREFIX + "step_failed"
    #: A step's own outcome was recorded as cancelled (its worker raised Cancel, or an
    #: operator or the API recorded it); descendants cancelled through edges are
    #: cascade_cancelled.
    STEP_CANCELLED = PREFIX + "step_cancelled"
    CASCADE_CANCELLED = PREFIX + "cascade_cancelled"
    #: An outcome report, stream delivery or completion event that changed nothing and
    #: was kept as evidence (duplicate, late, ambiguous, unmatched, replayed).
    EVIDENCE_RECORDED = PREFIX + "evidence_recorded"
    SIGNAL_RECORDED = PREFIX + "signal_recorded"
    REPAIRED = PREFIX + "repaired"
    WORKFLOW_FINISHED = PREFIX + "workflow_finished"


# -- the allow-list ------------------------------------------------------------------------

#: Longest workflow_name / queue value passed on; longer ones are cut to this.
MAX_NAME_CHARS: Final = 100

_STEP_STATES = frozenset(s.value for s in StepState)
_STATUSES = frozenset(s.value for s in CompletionStatus)

#: Every metadata key any event may carry, with its closed set of values. `None` marks
#: the two operator-named keys (workflow_name, queue): any short string that is not an id.
ALLOWED_METADATA: Final[Mapping[str, frozenset[str] | frozenset[int] | None]] = {
    # The name given to Workflow.new: one per kind of workflow, fixed in code.
    "workflow_name": None,
    # A step state, or a workflow state (running, finished).
    "state": _STEP_STATES | {"running", "finished"},
    # An outcome status as recorded (a retryable on its last attempt is recorded failed).
    "status": _STATUSES,
    # Evidence classifications: completions, stream deliveries, completion events, signals.
    "classification": frozenset(
        {
            "applied",
            "consumed",
            "recorded",
            "duplicate",
            "late",
            "ambiguous",
            "unmatched",
            "replayed",
            "dropped",
            "dead_letter",
            "retried",
        }
    ),
    # Why a step is terminal (steps.terminal_cause).
    "terminal_cause": _STATUSES
    | {
        "attempts_exhausted",
        "cancelled_by_dependency",
        "workflow_cancelled",
        "signal_deadline_expired",
    },
    # Explain's blocker codes (ledger.blockers.Blocker).
    "blocker_code": frozenset(b.value for b in Blocker),
    # Which part of Streamflow made the change.
    "source": frozenset(
        {"api", "worker", "consumer", "reconciler", "maintenance", "operator", "cli", "dashboard"}
    ),
    "semantics_version": frozenset({SEMANTICS_VERSION}),
    # What the reconciler (or a consumer) repaired (recoveries.repair).
    "repair": frozenset(
        {
            "streams_reset",
            "lease_expired",
            "retry_due",
            "dropped_event",
            "release",
            "redispatch",
            "pending_entry",
            "callback_lease_expired",
            "await_deadline",
        }
    ),
    # A workflow's final outcome.
    "outcome": frozenset({"completed", "failed", "cancelled"}),
    # Evidence kinds: an outcome report, a ready-stream delivery, a completion event.
    "kind": frozenset({"completion", "delivery", "event", "signal", "callback"}),
    # A queue name, as configured by the operator (worker --queues).
    "queue": None,
}

#: Every measurement any event may carry: durations in milliseconds, and counts.
ALLOWED_MEASUREMENTS: Final = frozenset(
    {
        "count",
        "steps",
        "roots",
        "attempt",
        "duration_ms",
        "queue_wait_ms",
        "ready_hop_ms",
        "event_hop_ms",
        "workflow_duration_ms",
    }
)


@dataclass(frozen=True, slots=True)
class EventSpec:
    doc: str
    metadata: frozenset[str]
    measurements: frozenset[str]


def _spec(doc: str, metadata: str, measurements: str) -> EventSpec:
    return EventSpec(doc, frozenset(metadata.split()), frozenset(measurements.split()))


#: What each event means, and the metadata keys and measurements it may carry.
EVENTS: Final[Mapping[Event, EventSpec]] = {
    Event.INSERTED: _spec(
        "a workflow was inserted", "workflow_name source semantics_version", "count steps roots"
    ),
    Event.STEP_RELEASED: _spec(
        "a step's dependencies were satisfied and it became available",
        "workflow_name queue source",
        "count",
    ),
    Event.STEP_STARTED: _spec(
        "a worker claimed a step and is about to perform it",
        "workflow_name queue source",
        "count attempt queue_wait_ms ready_hop_ms",
    ),
    Event.STEP_COMPLETED: _spec(
        "a step's outcome was recorded as completed",
        "workflow_name queue status source",
        "count attempt duration_ms",
    ),
    Event.STEP_FAILED: _spec(
        "an attempt failed: status=retryable (another is scheduled) or failed (terminal)",
        "workflow_name queue status terminal_cause source",
        "count attempt duration_ms",
    ),
    Event.STEP_CANCELLED: _spec(
        "a step's own outcome was recorded as cancelled",
        "workflow_name queue status terminal_cause source",
        "count attempt duration_ms",
    ),
    Event.CASCADE_CANCELLED: _spec(
        "descendants were cancelled through cancel edges by a terminal failure/cancellation",
        "workflow_name status terminal_cause source",
        "count",
    ),
    Event.EVIDENCE_RECORDED: _spec(
        "an incoming report, delivery or event was classified and kept as evidence",
        "workflow_name kind classification status state source",
        "count event_hop_ms",
    ),
    Event.SIGNAL_RECORDED: _spec(
        "an external signal was recorded, with its classification",
        "workflow_name classification source",
        "count",
    ),
    Event.REPAIRED: _spec(
        "the reconciler (or a consumer) repaired something the streams lost, per kind",
        "repair source",
        "count",
    ),
    Event.WORKFLOW_FINISHED: _spec(
        "a workflow recorded its final outcome",
        "workflow_name outcome source",
        "count workflow_duration_ms",
    ),
}

#: Our workflow ids (ledger.ids): never a metadata value, even under an allowed key.
_ID_LIKE = re.compile(r"[0-9a-f]{32}")


class TelemetryViolation(ValueError):
    """An event carried something outside the allow-list (raised in strict mode)."""


# -- attach / detach -----------------------------------------------------------------------


@dataclass(eq=False)
class Handle:
    """What `attach` returns; pass it to `detach`."""

    handler: Handler
    name: str
    failures: int = 0


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Replaced whole under the lock, read without it: emit never blocks on attach.
    handles: tuple[Handle, ...] = ()
    strict: bool = os.environ.get("STREAMFLOW_TELEMETRY_STRICT", "") == "1"
    #: (event, key, problem) seen so far; bounded (event x key x a few problems).
    violations: set[tuple[str, str, str]] = field(default_factory=set)


_state = _State()


def attach(handler: Handler, name: str | None = None) -> Handle:
    """Call `handler(event, measurements, metadata)` on every event from now on.

    Handlers run on the emitting thread (a worker's step thread, the consumer loop...):
    keep them quick. Each call gets its own dicts. A handler that raises is logged once
    and stays attached.
    """
    label = name or str(getattr(handler, "__qualname__", None) or repr(handler))
    handle = Handle(handler, label)
    with _state.lock:
        _state.handles = (*_state.handles, handle)
    return handle


def detach(handle: Handle) -> bool:
    """Stop calling the handler; False if it was not attached."""
    with _state.lock:
        if handle not in _state.handles:
            return False
        _state.handles = tuple(h for h in _state.handles if h is not handle)
        return True


def enabled() -> bool:
    """Whether any handler is attached: emitters check this before building anything."""
    return bool(_state.handles)


def set_strict(strict: bool) -> bool:
    """Raise on allow-list violations (tests) instead of dropping; returns the old value."""
    old, _state.strict = _state.strict, strict
    return old


def violations() -> set[tuple[str, str, str]]:
    """Allow-list violations seen since start (or `clear_violations`): (event, key, problem)."""
    with _state.lock:
        return set(_state.violations)


def clear_violations() -> None:
    with _state.lock:
        _state.violations.clear()


# -- emit ----------------------------------------------------------------------------------


def emit(
    event: Event | str,
    measurements: Mapping[str, float] | None = None,
    metadata: Mapping[str, str | int] | None = None,
) -> None:
    """Validate an event against the allow-list and hand it to every attached handler."""
    handles = _state.handles
    if not handles:
        return
    try:
        name = Event(event)
    except ValueError:
        _violation(str(event), "-", "unknown event")
        return
    spec = EVENTS[name]
    clean_meta = _clean_metadata(name, spec, metadata or {})
    clean_measure = _clean_measurements(name, spec, measurements or {})
    for h in handles:
        try:
            h.handler(name.value, dict(clean_measure), dict(clean_meta))
        except Exception:
            h.failures += 1
            if h.failures == 1:
                log_event(
                    "telemetry.handler_failed",
                    logging.ERROR,
                    handler=h.name,
                    telemetry_event=name.value,
                    exc_info=True,
                )


def _clean_metadata(event: Event, spec: EventSpec, metadata: Mapping[str, str | int]) -> Metadata:
    out: Metadata = {}
    for key, value in metadata.items():
        if key not in spec.metadata:
            where = "not in the allow-list" if key not in ALLOWED_METADATA else "not for this event"
            _violation(event, key, f"metadata key {where}")
            continue
        allowed = ALLOWED_METADATA[key]
        if allowed is None:
            if not isinstance(value, str) or not value:
                _violation(event, key, "not a non-empty string")
                continue
            value = value[:MAX_NAME_CHARS]
            if _ID_LIKE.fullmatch(value):
                _violation(event, key, "looks like a workflow id")
                continue
        elif isinstance(value, bool) or value not in allowed:
            _violation(event, key, "value outside the key's closed set")
            continue
        out[key] = value
    return out


def _clean_measurements(
    event: Event, spec: EventSpec, measurements: Mapping[str, float]
) -> Measurements:
    out: Measurements = {}
    for key, value in measurements.items():
        if key not in spec.measurements:
            _violation(event, key, "measurement not for this event")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            _violation(event, key, "measurement is not a number")
            continue
        out[key] = float(value)
    return out


def _violation(event: str, key: str, problem: str) -> None:
    with _state.lock:
        first = (event, key, problem) not in _state.violations
        _state.violations.add((event, key, problem))
    if _state.strict:
        raise TelemetryViolation(f"{event}: {key!r}: {problem}")
    if first:
        # The key's name is safe to log (it comes from code); its value is not.
        log_event(
            "telemetry.metadata_dropped",
            logging.WARNING,
            telemetry_event=event,
            key=key,
            problem=problem,
        )


# -- what the engine emits ------------------------------------------------------------------
#
# Each helper returns at once when nothing is attached, so callers need no guard, and
# never raises into the engine (a failed telemetry read is logged once) — except a
# TelemetryViolation in strict mode, which is the point of strict mode.

P = ParamSpec("P")


def _best_effort(fn: Callable[P, None]) -> Callable[P, None]:
    failed: list[bool] = []

    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except TelemetryViolation:
            raise
        except Exception:
            if not failed:
                failed.append(True)
                log_event(
                    "telemetry.emit_failed", logging.ERROR, emitter=fn.__name__, exc_info=True
                )

    return guarded


def source_of(source: str) -> str:
    """The component behind a ledger `source` ("consumer:host-1" -> "consumer")."""
    return source.split(":", 1)[0]


@_best_effort
def workflow_inserted(definition: WorkflowDefinition, source: str = "api") -> None:
    if not enabled():
        return
    roots = sum(1 for s in definition.steps if not s.deps)
    emit(
        Event.INSERTED,
        {"count": 1, "steps": len(definition.steps), "roots": roots},
        {
            "workflow_name": definition.name,
            "source": source,
            "semantics_version": SEMANTICS_VERSION,
        },
    )


@dataclass(frozen=True, slots=True)
class StepFacts:
    """What the completion events need that a CompletionResult does not carry."""

    workflow_name: str
    queue: str
    created_at: datetime | None = None


def step_facts(repo: Repo, workflow_id: str, step: str) -> StepFacts | None:
    """Read a step's workflow name, queue and the workflow's start (one indexed row)."""
    w, s = t.workflows, t.steps
    with read(repo) as conn:
        row = conn.execute(
            select(w.c.name, w.c.created_at, s.c.queue)
            .join(s, s.c.workflow_id == w.c.id)
            .where(w.c.id == workflow_id, s.c.name == step)
        ).first()
    if row is None:
        return None
    return StepFacts(row.name, row.queue, row.created_at)


def workflow_started_at(repo: Repo, workflow_id: str) -> datetime | None:
    with read(repo) as conn:
        value: datetime | None = conn.execute(
            select(t.workflows.c.created_at).where(t.workflows.c.id == workflow_id)
        ).scalar()
    return value


@_best_effort
def completion_recorded(
    repo: Repo,
    result: CompletionResult,
    *,
    source: str,
    facts: StepFacts | None = None,
    duration_ms: float | None = None,
) -> None:
    """The events one `complete_step` call implies: the step's own outcome (or the
    evidence it became), releases, the cascade, and the workflow's finish.

    `facts` are read from `repo` when not given (only while something is attached).
    """
    if not enabled():
        return
    if facts is None:
        facts = step_facts(repo, result.workflow_id, result.step)
        if facts is None:
            return
    src = source_of(source)
    name = facts.workflow_name
    if not result.applied:
        emit(
            Event.EVIDENCE_RECORDED,
            {"count": 1},
            {
                "workflow_name": name,
                "kind": "completion",
                "classification": result.classification.value,
                "status": result.status,
                "source": src,
            },
        )
        return

    measurements: Measurements = {"count": 1, "attempt": result.attempt}
    if duration_ms is not None:
        measurements["duration_ms"] = duration_ms
    meta: Metadata = {
        "workflow_name": name,
        "queue": facts.queue,
        "status": result.status,
        "source": src,
    }
    if result.status == CompletionStatus.COMPLETED:
        emit(Event.STEP_COMPLETED, measurements, meta)
    elif result.status == CompletionStatus.RETRYABLE:
        emit(Event.STEP_FAILED, measurements, meta)
    elif result.status == CompletionStatus.FAILED:
        meta["terminal_cause"] = result.reason or result.status
        emit(Event.STEP_FAILED, measurements, meta)
    else:
        meta["terminal_cause"] = result.reason or result.status
        emit(Event.STEP_CANCELLED, measurements, meta)

    for queue in _released_queues(repo, result):
        emit(
            Event.STEP_RELEASED,
            {"count": 1},
            {"workflow_name": name, "queue": queue, "source": src},
        )
    if result.cancelled:
        emit(
            Event.CASCADE_CANCELLED,
            {"count": len(result.cancelled)},
            {
                "workflow_name": name,
                "status": result.status,
                "terminal_cause": "cancelled_by_dependency",
                "source": src,
            },
        )
    if result.workflow_outcome is not None:
        finished: Measurements = {"count": 1}
        started = facts.created_at or workflow_started_at(repo, result.workflow_id)
        if started is not None:
            finished["workflow_duration_ms"] = _ms_since(started)
        emit(
            Event.WORKFLOW_FINISHED,
            finished,
            {"workflow_name": name, "outcome": result.workflow_outcome, "source": src},
        )


def _released_queues(repo: Repo, result: CompletionResult) -> list[str]:
    """The queue of each released step: from `ready` when the call dispatched them all,
    else one read."""
    if not result.released:
        return []
    by_step = {r.step: r.queue for r in result.ready}
    missing = [s for s in result.released if s not in by_step]
    if missing:
        s = t.steps
        with read(repo) as conn:
            rows = conn.execute(
                select(s.c.name, s.c.queue).where(
                    s.c.workflow_id == result.workflow_id, s.c.name.in_(missing)
                )
            ).all()
        by_step.update({r.name: r.queue for r in rows})
    return [by_step[s] for s in result.released if s in by_step]


def _ms_since(then: datetime) -> float:
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds() * 1000)


@_best_effort
def step_started(
    *,
    workflow_name: str,
    queue: str,
    attempt: int,
    claimed_at: datetime,
    available_at: datetime | None,
    ready_at_ms: int | None,
) -> None:
    """A worker claimed a step: queue wait is claim time - available_at; the ready hop is
    claim time - when its ready message was published."""
    if not enabled():
        return
    measurements: Measurements = {"count": 1, "attempt": attempt}
    if available_at is not None:
        if available_at.tzinfo is None:
            available_at = available_at.replace(tzinfo=UTC)
        measurements["queue_wait_ms"] = max(0.0, (claimed_at - available_at).total_seconds() * 1000)
    if ready_at_ms is not None:
        measurements["ready_hop_ms"] = max(0.0, claimed_at.timestamp() * 1000 - ready_at_ms)
    emit(
        Event.STEP_STARTED,
        measurements,
        {"workflow_name": workflow_name, "queue": queue, "source": "worker"},
    )


@_best_effort
def evidence_recorded(
    *,
    kind: str,
    classification: str,
    source: str,
    status: str | None = None,
    state: str | None = None,
    workflow_name: str | None = None,
    event_hop_ms: float | None = None,
) -> None:
    if not enabled():
        return
    meta: Metadata = {"kind": kind, "classification": classification, "source": source_of(source)}
    if status is not None:
        meta["status"] = status
    if state is not None:
        meta["state"] = state
    if workflow_name is not None:
        meta["workflow_name"] = workflow_name
    measurements: Measurements = {"count": 1}
    if event_hop_ms is not None:
        measurements["event_hop_ms"] = max(0.0, event_hop_ms)
    emit(Event.EVIDENCE_RECORDED, measurements, meta)


#: A refused claim's verdict -> how ledger.claims keeps the delivery as evidence.
_DELIVERY_CLASSIFICATION: Final = {
    "duplicate": "duplicate",
    "late": "late",
    "not_ready": "replayed",
}


@_best_effort
def delivery_refused(verdict: str, state: str) -> None:
    """A ready message that could not claim its step, in `state` (kept as evidence)."""
    if not enabled():
        return
    classification = _DELIVERY_CLASSIFICATION.get(verdict)
    if classification is not None:
        evidence_recorded(
            kind="delivery", classification=classification, source="worker", state=state
        )


@_best_effort
def cancel_recorded(
    repo: Repo,
    workflow_id: str,
    *,
    cancelled_steps: int,
    workflow_outcome: str | None,
    applied: bool,
    source: str = "api",
) -> None:
    """For `Workflow.cancel`: the steps it cancelled (terminal_cause workflow_cancelled)
    and, when it applied, the workflow's finish with outcome cancelled."""
    if not enabled():
        return
    w = t.workflows
    with read(repo) as conn:
        row = conn.execute(select(w.c.name, w.c.created_at).where(w.c.id == workflow_id)).first()
    if row is None:
        return
    src = source_of(source)
    if cancelled_steps:
        emit(
            Event.STEP_CANCELLED,
            {"count": cancelled_steps},
            {
                "workflow_name": row.name,
                "status": "cancelled",
                "terminal_cause": "workflow_cancelled",
                "source": src,
            },
        )
    if applied and workflow_outcome is not None:
        emit(
            Event.WORKFLOW_FINISHED,
            {"count": 1, "workflow_duration_ms": _ms_since(row.created_at)},
            {"workflow_name": row.name, "outcome": workflow_outcome, "source": src},
        )


@_best_effort
def signal_recorded(*, workflow_name: str, classification: str, source: str = "api") -> None:
    """For `Workflow.signal`: one event per recorded signal, by classification."""
    if not enabled():
        return
    emit(
        Event.SIGNAL_RECORDED,
        {"count": 1},
        {
            "workflow_name": workflow_name,
            "classification": classification,
            "source": source_of(source),
        },
    )


@_best_effort
def repaired(repairs: Mapping[str, int], *, source: str) -> None:
    """One event per repair kind with its count (kinds with a zero count are skipped)."""
    if not enabled():
        return
    for repair, count in repairs.items():
        if count:
            emit(Event.REPAIRED, {"count": count}, {"repair": repair, "source": source_of(source)})
