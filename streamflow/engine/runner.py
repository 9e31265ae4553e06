"""Running engine components together in one process, and stopping them cleanly.

Each component (workers, a completion consumer, the maintenance loop) runs in its own
thread against a shared stop event. SIGTERM or SIGINT sets it: workers stop claiming and
drain, consumers finish their batch, and the process exits 0. A component that dies of
an error that is not a passing infrastructure fault stops the others, and the process
exits non-zero with the error logged.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from streamflow.logs import log_event


@dataclass
class Runner:
    stop: threading.Event = field(default_factory=threading.Event)
    failed: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def add(self, name: str, target: Callable[[threading.Event], None]) -> None:
        def guarded() -> None:
            try:
                target(self.stop)
            except BaseException:
                log_event("process.component_failed", logging.ERROR, component=name, exc_info=True)
                self.failed.append(name)
                self.stop.set()

        self._threads.append(threading.Thread(target=guarded, name=name))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every component; True if all finished within `timeout`."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def run_until_signalled(self, drain_seconds: float) -> int:
        """Start, wait for SIGTERM/SIGINT (or a component failure), drain; the exit code."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log_event("process.stopping", signal=signal.Signals(signum).name)
            self.stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self.stop.wait(0.5):
                pass
            finished = self.join(drain_seconds + 10)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not finished:
            log_event(
                "process.stop_timeout",
                logging.ERROR,
                alive=[t.name for t in self._threads if t.is_alive()],
            )
        log_event("process.stopped", failed=self.failed)
        return 1 if self.failed or not finished else 0
