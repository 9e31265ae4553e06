"""Encoding and decoding the two stream messages; malformed entries are named precisely."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger.rules import CompletionStatus
from streamflow.streams.codec import (
    CompletionEvent,
    MalformedEntry,
    ReadyMessage,
    decode,
    decode_completion,
    decode_ready,
    encode,
    encode_completion,
    encode_ready,
)

EVENT = CompletionEvent("wf1", "charge", CompletionStatus.COMPLETED, 2, at_ms=1_700_000_000_000)
READY = ReadyMessage("wf1", "ship", "emails", at_ms=1_700_000_000_001, priority=-3)


def test_completion_round_trip() -> None:
    fields = encode_completion(EVENT)
    assert fields == {
        "v": "1",
        "kind": "completion",
        "workflow_id": "wf1",
        "step": "charge",
        "status": "completed",
        "attempt": "2",
        "key": "wf1:charge:2:completed",
        "at_ms": "1700000000000",
    }
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert decode_completion(fields) == EVENT
    assert decode(fields) == EVENT


def test_idempotency_key_is_deterministic_and_covers_attempt_and_status() -> None:
    same = CompletionEvent("wf1", "charge", CompletionStatus.COMPLETED, 2, at_ms=5)
    assert same.idempotency_key == EVENT.idempotency_key  # time is not part of it
    retried = CompletionEvent("wf1", "charge", CompletionStatus.COMPLETED, 3, at_ms=5)
    failed = CompletionEvent("wf1", "charge", CompletionStatus.FAILED, 2, at_ms=5)
    assert len({EVENT.idempotency_key, retried.idempotency_key, failed.idempotency_key}) == 3


def test_ready_round_trip() -> None:
    fields = encode_ready(READY)
    assert fields["kind"] == "ready"
    assert fields["priority"] == "-3"
    assert decode_ready(fields) == READY
    assert decode(fields) == READY
    assert encode(READY) == fields


def test_ready_priority_is_optional() -> None:
    fields = encode_ready(READY)
    del fields["priority"]
    assert decode_ready(fields).priority == 0


def test_extra_fields_are_tolerated() -> None:
    fields = {**encode_completion(EVENT), "trace_id": "abc"}
    assert decode(fields) == EVENT


def _without(fields: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k != name}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda f: _without(f, "v"), "missing field 'v'"),
        (lambda f: {**f, "v": "2"}, "unsupported version v='2'"),
        (lambda f: {**f, "kind": "gossip"}, "unknown kind 'gossip'"),
        (lambda f: _without(f, "workflow_id"), "missing field 'workflow_id'"),
        (lambda f: {**f, "step": ""}, "field 'step' is empty"),
        (lambda f: {**f, "status": "exploded"}, "unknown status 'exploded'"),
        (lambda f: {**f, "attempt": "two"}, "field 'attempt' is not a decimal integer"),
        (lambda f: {**f, "attempt": "-1"}, "field 'attempt' is not a decimal integer"),
        (lambda f: {**f, "attempt": " 2"}, "field 'attempt' is not a decimal integer"),
        (lambda f: {**f, "attempt": "٢"}, "field 'attempt' is not a decimal integer"),
        (lambda f: {**f, "at_ms": "1e3"}, "field 'at_ms' is not a decimal integer"),
        (lambda f: _without(f, "key"), "missing field 'key'"),
        (lambda f: {**f, "key": "wf1:charge:1:completed"}, "does not match"),
    ],
)
def test_malformed_completions_say_what_is_wrong(
    change: Callable[[dict[str, str]], dict[str, str]], problem: str
) -> None:
    fields = change(encode_completion(EVENT))
    with pytest.raises(MalformedEntry) as caught:
        decode(fields)
    assert problem in caught.value.problem
    assert caught.value.fields == fields


def test_kind_mismatch_is_malformed() -> None:
    with pytest.raises(MalformedEntry, match="expected kind 'ready'"):
        decode_ready(encode_completion(EVENT))
    with pytest.raises(MalformedEntry, match="expected kind 'completion'"):
        decode_completion(encode_ready(READY))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"v": "1", "kind": "ready", "workflow_id": "w", "step": "s", "at_ms": "1"},  # no queue
        {**encode_ready(READY), "priority": "high"},
        {**encode_ready(READY), "priority": "-0"},
    ],
)
def test_malformed_ready_messages(fields: dict[str, str]) -> None:
    with pytest.raises(MalformedEntry):
        decode(fields)


def test_non_mapping_is_malformed() -> None:
    with pytest.raises(MalformedEntry, match="not a mapping"):
        decode(["v", "1"])  # type: ignore[arg-type]


def test_malformed_entry_is_a_value_error_with_a_readable_message() -> None:
    exc = MalformedEntry("missing field 'v'", {"x": "1"})
    assert isinstance(exc, ValueError)
    assert str(exc) == "malformed stream entry: missing field 'v'"


@pytest.mark.parametrize(
    "build",
    [
        lambda: CompletionEvent("", "s", CompletionStatus.COMPLETED, 1, at_ms=0),
        lambda: CompletionEvent("w", "s", "completed", 1, at_ms=0),  # type: ignore[arg-type]
        lambda: CompletionEvent("w", "s", CompletionStatus.FAILED, -1, at_ms=0),
        lambda: CompletionEvent("w", "s", CompletionStatus.FAILED, True, at_ms=0),
        lambda: ReadyMessage("w", "s", "", at_ms=0),
        lambda: ReadyMessage("w", "s", "q", at_ms=-5),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()
