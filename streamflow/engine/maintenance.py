"""The maintenance loop: the dispatcher, in the consumer process.

Woken by PostgreSQL NOTIFY when a commit left steps to dispatch (see
`streamflow.engine.wakeup`), and every `poll_seconds` regardless, it moves due retries
back to `available` and publishes every available step nobody dispatched (new roots, API
completions, retries). Less often it trims the streams below what every group has
acknowledged. Each query reads one partial index, so an idle pass costs next to nothing.
Repairs — expired leases, lost messages, dropped events — are the reconciler's
(`streamflow.reconciler`), which runs beside it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine

from ledger.model import ReadyStep
from ledger.sweeps import (
    dispatch_undispatched,
    promote_due_retries,
)
from ledger.transitions import unmark_dispatched
from streamflow.engine.common import in_transaction, ready_messages, utcnow
from streamflow.engine.retrying import is_transient
from streamflow.engine.wakeup import DispatchWakeup
from streamflow.logs import log_event
from streamflow.streams.keys import StreamKeys
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import StreamTransport


@dataclass(frozen=True, slots=True)
class MaintenanceConfig:
    poll_seconds: float = 0.1
    #: Passes woken by notifications come at most this often: a burst of commits (each
    #: notifies) is served by a pass every few milliseconds, not one per commit, while a
    #: lone commit after a quiet spell is dispatched at once.
    min_pass_seconds: float = 0.005
    trim_seconds: float = 30.0
    batch: int = 500


@dataclass
class MaintenanceStats:
    passes: int = 0
    dispatched: int = 0
    retries_promoted: int = 0
    trimmed: int = 0


@dataclass
class _Timer:
    every: float
    due: float = 0.0

    def ready(self, now: float) -> bool:
        if now < self.due:
            return False
        self.due = now + self.every
        return True


@dataclass
class Maintenance:
    engine: Engine
    transport: StreamTransport
    keys: StreamKeys
    config: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    stats: MaintenanceStats = field(default_factory=MaintenanceStats)
    #: Queues seen so far, whose ready streams get trimmed.
    queues: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.publisher = Publisher(self.transport, self.keys)
        #: Set while `run` runs (tests wait for it to listen).
        self.wakeup: DispatchWakeup | None = None
        self._trim = _Timer(self.config.trim_seconds)
        self._promote = _Timer(self.config.poll_seconds)

    def run(self, stop: threading.Event) -> None:
        wakeup = self.wakeup = DispatchWakeup(self.engine, stop)
        log_event("maintenance.started", poll_seconds=self.config.poll_seconds)
        woken = False
        last_pass = float("-inf")
        try:
            while not stop.is_set():
                if woken:
                    rest = last_pass + self.config.min_pass_seconds - time.monotonic()
                    if rest > 0 and stop.wait(rest):
                        break
                    # The commits that notified meanwhile are served by this pass too.
                    wakeup.drain()
                last_pass = time.monotonic()
                try:
                    # Retries fall due with time, not with commits: a pass a notification
                    # woke looks for them only once per poll interval. (A burst of
                    # inserts wakes one pass per commit.)
                    busy = self.tick(promote=not woken or self._promote.ready(time.monotonic()))
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log_event("maintenance.unavailable", logging.WARNING, error=str(exc)[:200])
                    stop.wait(1.0)
                    continue
                woken = False
                if not busy:
                    # Woken at once by a commit that left steps to dispatch; the poll
                    # interval is the fallback.
                    woken = wakeup.wait(self.config.poll_seconds)
        finally:
            wakeup.close()
        log_event("maintenance.stopped", **vars(self.stats))

    def tick(self, *, promote: bool = True) -> bool:
        """One pass; True if it found work (so the next pass comes at once). `promote`:
        move due retries (of steps and of callbacks) back to `available` first."""
        now = time.monotonic()
        batch = self.config.batch
        self.stats.passes += 1
        if promote:
            self._promote.due = now + self.config.poll_seconds
        # One transaction for both: a pass costs one commit, and it runs ten times a second
        # whether or not there is work.
        promoted, ready = in_transaction(
            self.engine,
            lambda c: (
                promote_due_retries(c, utcnow(), batch) if promote else [],
                dispatch_undispatched(c, utcnow(), batch, promote=promote),
            ),
        )
        self.stats.retries_promoted += len(promoted)
        self._publish(ready)
        self.stats.dispatched += len(ready)
        found = len(ready) >= batch or bool(promoted)
        if self._trim.ready(now):
            self.trim()
        return found

    def _publish(self, ready: tuple[ReadyStep, ...] | list[ReadyStep]) -> None:
        if not ready:
            return
        self.queues.update(r.queue for r in ready)
        if not self.publisher.publish_ready(ready_messages(list(ready))):
            in_transaction(self.engine, lambda c: unmark_dispatched(c, ready))

    def trim(self) -> None:
        """Trim every partition's streams (each XTRIM touches one stream, one slot)."""
        removed = 0
        for stream in self.keys.all_completions():
            removed += self.transport.trim_acknowledged(stream, [self.keys.completion_group])
        for stream in self.keys.ready_streams(sorted(self.queues)):
            removed += self.transport.trim_acknowledged(stream, [self.keys.workers_group])
        self.stats.trimmed += removed
