"""The two messages carried on streams, as flat str -> str fields.

    completion:  v=1 kind=completion workflow_id step status attempt key at_ms
    ready:       v=1 kind=ready workflow_id step queue priority at_ms [job]

`job` is `step` (the default, and then omitted) or `callback`: the workflow's `on_finish`
job, whose `step` is then `on_finish`.

Messages are hints, never truth: the ledger decides what happens. So decoding is strict
(anything odd raises `MalformedEntry`, which the engine dead-letters and records rather
than crashing or guessing) but tolerant of extra fields, so a later minor addition within
`v=1` does not dead-letter everything an older consumer reads. A breaking change bumps `v`.

The idempotency key is derived, not chosen: `workflow_id:step:attempt:status`. Two
publishes of the same outcome therefore carry the same key, and a key that disagrees with
the rest of the entry means the entry is corrupt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ledger.rules import CompletionStatus

VERSION = "1"
Kind = Literal["completion", "ready"]
#: What a ready message offers: a step, or a workflow's `on_finish` callback.
JOBS = ("step", "callback")

# Plain ASCII decimal: int() would also take " 1", "+1", "1_0" and Unicode digits.
_NON_NEGATIVE = re.compile(r"0|[1-9][0-9]*")
_INTEGER = re.compile(r"0|-?[1-9][0-9]*")


class MalformedEntry(ValueError):
    """A stream entry that is not a message this version understands."""

    def __init__(self, problem: str, fields: Mapping[str, str]) -> None:
        super().__init__(f"malformed stream entry: {problem}")
        #: What was wrong, one short phrase (kept as evidence when dead-lettered).
        self.problem = problem
        #: The entry's fields as received.
        self.fields = dict(fields)


def _require_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _require_int(what: str, value: object, minimum: int | None = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


@dataclass(frozen=True, slots=True)
class CompletionEvent:
    """A step's recorded outcome, published after the ledger transaction committed."""

    workflow_id: str
    step: str
    status: CompletionStatus
    attempt: int
    #: Milliseconds since the epoch when the outcome was recorded.
    at_ms: int

    def __post_init__(self) -> None:
        _require_text("workflow_id", self.workflow_id)
        _require_text("step", self.step)
        if not isinstance(self.status, CompletionStatus):
            raise ValueError(f"status must be a CompletionStatus, got {self.status!r}")
        _require_int("attempt", self.attempt)
        _require_int("at_ms", self.at_ms)

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}:{self.step}:{self.attempt}:{self.status.value}"


@dataclass(frozen=True, slots=True)
class ReadyMessage:
    """A step that is `available` in the ledger, offered to its queue's workers."""

    workflow_id: str
    step: str
    queue: str
    at_ms: int
    priority: int = 0
    #: step, or callback (the workflow's `on_finish` job).
    job: str = "step"

    def __post_init__(self) -> None:
        _require_text("workflow_id", self.workflow_id)
        _require_text("step", self.step)
        _require_text("queue", self.queue)
        _require_int("at_ms", self.at_ms)
        _require_int("priority", self.priority, minimum=None)
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {', '.join(JOBS)}, got {self.job!r}")


Message = CompletionEvent | ReadyMessage


def encode_completion(event: CompletionEvent) -> dict[str, str]:
    return {
        "v": VERSION,
        "kind": "completion",
        "workflow_id": event.workflow_id,
        "step": event.step,
        "status": event.status.value,
        "attempt": str(event.attempt),
        "key": event.idempotency_key,
        "at_ms": str(event.at_ms),
    }


def encode_ready(message: ReadyMessage) -> dict[str, str]:
    fields = {
        "v": VERSION,
        "kind": "ready",
        "workflow_id": message.workflow_id,
        "step": message.step,
        "queue": message.queue,
        "priority": str(message.priority),
        "at_ms": str(message.at_ms),
    }
    if message.job != "step":
        fields["job"] = message.job
    return fields


def encode(message: Message) -> dict[str, str]:
    if isinstance(message, CompletionEvent):
        return encode_completion(message)
    return encode_ready(message)


def _field(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise MalformedEntry(f"missing field {name!r}", fields)
    if not isinstance(value, str):
        raise MalformedEntry(f"field {name!r} is not a string", fields)
    if not value:
        raise MalformedEntry(f"field {name!r} is empty", fields)
    return value


def _int_field(fields: Mapping[str, str], name: str, *, signed: bool = False) -> int:
    raw = _field(fields, name)
    if not (_INTEGER if signed else _NON_NEGATIVE).fullmatch(raw):
        raise MalformedEntry(f"field {name!r} is not a decimal integer: {raw!r}", fields)
    return int(raw)


def _check_header(fields: Mapping[str, str], expected: Kind | None) -> Kind:
    if not isinstance(fields, Mapping):
        raise MalformedEntry(f"fields are a {type(fields).__name__}, not a mapping", {})
    version = _field(fields, "v")
    if version != VERSION:
        raise MalformedEntry(f"unsupported version v={version!r}", fields)
    kind = _field(fields, "kind")
    if kind not in ("completion", "ready"):
        raise MalformedEntry(f"unknown kind {kind!r}", fields)
    if expected is not None and kind != expected:
        raise MalformedEntry(f"expected kind {expected!r}, got {kind!r}", fields)
    return "completion" if kind == "completion" else "ready"


def decode_completion(fields: Mapping[str, str]) -> CompletionEvent:
    _check_header(fields, "completion")
    raw_status = _field(fields, "status")
    try:
        status = CompletionStatus(raw_status)
    except ValueError:
        raise MalformedEntry(f"unknown status {raw_status!r}", fields) from None
    event = CompletionEvent(
        workflow_id=_field(fields, "workflow_id"),
        step=_field(fields, "step"),
        status=status,
        attempt=_int_field(fields, "attempt"),
        at_ms=_int_field(fields, "at_ms"),
    )
    key = _field(fields, "key")
    if key != event.idempotency_key:
        raise MalformedEntry(
            f"idempotency key {key!r} does not match the entry ({event.idempotency_key!r})",
            fields,
        )
    return event


def decode_ready(fields: Mapping[str, str]) -> ReadyMessage:
    _check_header(fields, "ready")
    # priority is optional so a producer that does not care need not send it.
    priority = _int_field(fields, "priority", signed=True) if "priority" in fields else 0
    job = _field(fields, "job") if "job" in fields else "step"
    if job not in JOBS:
        raise MalformedEntry(f"unknown job {job!r}", fields)
    return ReadyMessage(
        workflow_id=_field(fields, "workflow_id"),
        step=_field(fields, "step"),
        queue=_field(fields, "queue"),
        at_ms=_int_field(fields, "at_ms"),
        priority=priority,
        job=job,
    )


def decode(fields: Mapping[str, str]) -> Message:
    """Decode either kind, dispatching on the `kind` field."""
    if _check_header(fields, None) == "completion":
        return decode_completion(fields)
    return decode_ready(fields)
