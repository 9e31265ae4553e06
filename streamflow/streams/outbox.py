"""The worker's outbox: completion events and ready-entry acknowledgements sent to Redis
from a thread of their own.

Both follow a commit and nothing waits for them. A completion event is accounted for by
the consumer, and the reconciler repairs one that never arrives; an entry left
unacknowledged is harmless, since whoever takes it over finds its step claimed and
records a duplicate. So a step thread should not wait on Redis for either — above all
not when it is about to run the child its outcome handed off. It puts them here and goes
on; this thread sends whatever has queued up, in order: the events in one round trip,
the acknowledgements in one XACK per stream.

What a crash can lose is what a failed send loses: the events not yet sent (the
reconciler finds them in the ledger) and the acknowledgements (their entries are taken
over and found claimed). A failed batch is logged and not retried; `close()` sends
everything queued before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass

from streamflow.logs import log_event
from streamflow.streams.codec import CompletionEvent
from streamflow.streams.publisher import Publisher

#: Events per round trip at most: a bound on one pipeline's size.
DEFAULT_MAX_BATCH = 200

_STOP = object()


@dataclass(frozen=True, slots=True)
class Ack:
    """A ready entry handled: acknowledge it in its consumer group."""

    stream: str
    group: str
    entry_id: str


class StreamOutbox:
    def __init__(self, publisher: Publisher, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.publisher = publisher
        self.max_batch = max_batch
        self.failed_batches = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="completion-outbox"
                )
                self._thread.start()

    def put(self, item: CompletionEvent | Ack) -> None:
        """Queue `item` for the outbox's thread; sent at once if it is not running."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(item)
                return
        self._send([item])

    def close(self, timeout: float = 10.0) -> None:
        """Send everything queued, then stop the thread (`start` may run it again)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(_STOP)
        thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._send(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _send(self, items: list[CompletionEvent | Ack]) -> None:
        events = [i for i in items if isinstance(i, CompletionEvent)]
        if events and not self.publisher.publish_completions(events):
            self.failed_batches += 1
        acks: dict[tuple[str, str], list[str]] = defaultdict(list)
        for i in items:
            if isinstance(i, Ack):
                acks[(i.stream, i.group)].append(i.entry_id)
        for (stream, group), ids in acks.items():
            try:
                self.publisher.transport.ack(stream, group, ids)
            # Whatever the transport raises: the claims are committed, the entries are
            # only left pending (see the module's docstring).
            except Exception as exc:
                self.failed_batches += 1
                log_event(
                    "worker.ack_failed",
                    logging.WARNING,
                    stream=stream,
                    entries=len(ids),
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )
