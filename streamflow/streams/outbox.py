"""The worker's completion outbox: completion events published from a thread of their own.

A completion event is announced after its outcome committed, and nothing waits for it:
the consumer accounts for it, and the reconciler repairs one that never arrives. So the
step thread should not wait on Redis for it either — above all not when it is about to run
the child its outcome handed off. The step thread puts the event here and goes on; this
thread publishes whatever has queued up, in order, many events in one round trip.

What a crash can lose is what a failed publish loses: the events not yet sent, which the
reconciler finds in the ledger. A failed batch is logged (by `Publisher`) and not
retried; `close()` sends everything queued before it returns.
"""

from __future__ import annotations

import queue
import threading

from streamflow.streams.codec import CompletionEvent
from streamflow.streams.publisher import Publisher

#: Events per round trip at most: a bound on one pipeline's size.
DEFAULT_MAX_BATCH = 200

_STOP = object()


class CompletionOutbox:
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

    def put(self, event: CompletionEvent) -> None:
        """Queue `event` for the outbox's thread; published at once if it is not running."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(event)
                return
        self._send([event])

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

    def _send(self, events: list[CompletionEvent]) -> None:
        if not self.publisher.publish_completions(events):
            self.failed_batches += 1
