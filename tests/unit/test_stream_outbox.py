"""The worker's outbox: completion events and acknowledgements leave on a thread of their
own, in batches, in the order they were put; closing flushes what is queued; a failed
send is logged and the outbox goes on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest

from ledger.rules import CompletionStatus
from streamflow.streams.codec import CompletionEvent, decode_completion
from streamflow.streams.keys import StreamKeys
from streamflow.streams.outbox import Ack, StreamOutbox
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import Fields


class RecordingTransport:
    """Records each call; `gate` (when set) holds every call until it is released, and
    `failures` fails that many calls first."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, Fields]]] = []
        self.acks: list[tuple[str, str, list[str]]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.failures = 0

    def _arrive(self) -> None:
        """Every call: note it, wait at the gate, fail if failures are left."""
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "the test never opened the gate"
        if self.failures:
            self.failures -= 1
            raise ConnectionError("injected")

    def _call(self, items: list[tuple[str, Fields]]) -> list[str]:
        self._arrive()
        self.calls.append(items)
        return [f"{i}-0" for i in range(len(items))]

    def add(self, stream: str, fields: Fields) -> str:
        return self._call([(stream, fields)])[0]

    def add_many(self, items: Sequence[tuple[str, Fields]]) -> list[str]:
        return self._call(list(items))

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        self._arrive()
        self.acks.append((stream, group, list(ids)))
        return len(ids)


def event(n: int) -> CompletionEvent:
    return CompletionEvent(f"wf{n % 3}", f"s{n}", CompletionStatus.COMPLETED, 1, at_ms=n)


def published(transport: RecordingTransport) -> list[CompletionEvent]:
    return [decode_completion(fields) for call in transport.calls for _, fields in call]


def outbox_for(transport: RecordingTransport, **kw: int) -> StreamOutbox:
    return StreamOutbox(Publisher(transport, StreamKeys()), **kw)  # type: ignore[arg-type]


def test_events_put_while_a_publish_is_in_flight_leave_together_in_order() -> None:
    transport = RecordingTransport()
    transport.gate = threading.Event()
    outbox = outbox_for(transport)
    outbox.start()
    outbox.put(event(0))
    assert transport.entered.wait(5)  # the first publish is in flight, held at the gate
    for n in range(1, 40):
        outbox.put(event(n))
    transport.gate.set()
    outbox.close(timeout=5)
    assert published(transport) == [event(n) for n in range(40)]
    assert [len(c) for c in transport.calls] == [1, 39]


def test_a_batch_is_capped() -> None:
    transport = RecordingTransport()
    transport.gate = threading.Event()
    outbox = outbox_for(transport, max_batch=10)
    outbox.start()
    outbox.put(event(0))
    assert transport.entered.wait(5)
    for n in range(1, 25):
        outbox.put(event(n))
    transport.gate.set()
    outbox.close(timeout=5)
    assert published(transport) == [event(n) for n in range(25)]
    assert [len(c) for c in transport.calls] == [1, 10, 10, 4]


def test_without_its_thread_the_outbox_publishes_at_once() -> None:
    transport = RecordingTransport()
    outbox = outbox_for(transport)
    outbox.put(event(1))  # never started
    assert published(transport) == [event(1)]
    outbox.start()
    outbox.close(timeout=5)
    outbox.put(event(2))  # closed
    assert published(transport) == [event(1), event(2)]


def _first_fails_then_second_goes(
    caplog: pytest.LogCaptureFixture,
    first: CompletionEvent | Ack,
    second: CompletionEvent | Ack,
    logger: str | None = None,
) -> tuple[RecordingTransport, StreamOutbox]:
    """Put `first` while the transport fails once, then `second`: each in a batch of its
    own (close, start again)."""
    transport = RecordingTransport()
    transport.failures = 1
    outbox = outbox_for(transport)
    outbox.start()
    with caplog.at_level(logging.WARNING, logger=logger):
        outbox.put(first)
        outbox.close(timeout=5)  # the failed batch is not retried: the reconciler repairs it
        outbox.start()
        outbox.put(second)
        outbox.close(timeout=5)
    return transport, outbox


def test_a_failed_publish_is_logged_and_the_outbox_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, outbox = _first_fails_then_second_goes(
        caplog, event(1), event(2), logger="streamflow.streams"
    )
    assert published(transport) == [event(2)]
    assert [r.getMessage() for r in caplog.records] == ["stream.publish_failed"]
    assert outbox.failed_batches == 1


def test_acknowledgements_queued_together_are_one_xack_per_stream() -> None:
    transport = RecordingTransport()
    transport.gate = threading.Event()
    outbox = outbox_for(transport)
    outbox.start()
    outbox.put(Ack("ready:a", "workers", "1-0"))
    assert transport.entered.wait(5)
    outbox.put(Ack("ready:a", "workers", "2-0"))
    outbox.put(event(1))
    outbox.put(Ack("ready:b", "workers", "3-0"))
    outbox.put(Ack("ready:a", "workers", "4-0"))
    transport.gate.set()
    outbox.close(timeout=5)
    assert transport.acks == [
        ("ready:a", "workers", ["1-0"]),
        ("ready:a", "workers", ["2-0", "4-0"]),
        ("ready:b", "workers", ["3-0"]),
    ]
    assert published(transport) == [event(1)]


def test_a_failed_acknowledgement_is_logged_and_the_outbox_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, outbox = _first_fails_then_second_goes(
        caplog, Ack("ready:a", "workers", "1-0"), Ack("ready:a", "workers", "2-0")
    )
    assert transport.acks == [("ready:a", "workers", ["2-0"])]
    assert outbox.failed_batches == 1
    assert any(r.getMessage() == "worker.ack_failed" for r in caplog.records)
