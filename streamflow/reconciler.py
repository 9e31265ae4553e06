"""The DB-first reconciler: one pass finds what the streams lost and makes the ledger win.

A pass, in order:

1. streams — if Redis lost the data of any partition (its epoch marker is gone: the
   server or the Cluster shard holding it restarted empty, or the partition count
   changed and its streams are new), recreate the groups and re-dispatch every available
   step from the ledger;
2. leases — executing steps whose lease expired go back to retryable (or failed, by the
   attempt budget), the rescue Oban calls Lifeline; `on_finish` callbacks likewise;
3. awaits and retries — a step whose signal did not arrive by its deadline fails (and
   cascades); retryable steps overdue for their retry go back to available;
4. dropped events — outcomes whose completion event no consumer consumed within a grace
   period are declared `dropped` and their release applied if missing;
5. releases — steps that finished recently with a child still pending that should have
   been released or cancelled;
6. stale dispatch — available steps dispatched long ago and never claimed;
7. pending entries — stream entries idle past a threshold are taken over: completion
   events are consumed, ready entries handed back to the dispatcher, poison dead-lettered;
8. dispatch — anything available and undispatched is published.

Every repair writes a recovery row carrying the pass id; every pass writes a summary row.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, select

from ledger import tables as t
from ledger.callback_jobs import callback_state, expire_callback_leases
from ledger.model import CALLBACK_JOB, ReadyStep
from ledger.reconcile import (
    RESUME_FROM,
    find_dropped_events,
    find_unapplied_releases,
    finish_pass,
    live_queues,
    repair_dropped_event,
    repair_releases,
    resume_point,
    start_pass,
    undispatch_all_available,
)
from ledger.recoveries import record_recovery
from ledger.signals import expire_awaits
from ledger.sweeps import (
    dispatch_undispatched,
    expire_leases,
    promote_due_retries,
    redispatch_stale,
)
from ledger.transitions import unmark_dispatched
from streamflow import telemetry
from streamflow.engine.common import in_transaction, ready_messages, utcnow
from streamflow.engine.consumer import CompletionConsumer, ConsumerConfig
from streamflow.engine.deadletter import dead_letter
from streamflow.engine.retrying import is_transient, retrying
from streamflow.logs import log_event
from streamflow.streams.codec import MalformedEntry, decode_ready
from streamflow.streams.keys import StreamKeys
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import Entry, StreamTransport


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    #: An available step dispatched this long ago and still unclaimed is sent again.
    redispatch_after: timedelta = timedelta(seconds=30)
    #: How long a worker's completion event may take to be consumed before it counts as
    #: dropped.
    dropped_after: timedelta = timedelta(seconds=30)
    #: A retry overdue by this much was missed by the dispatcher.
    overdue_retry: timedelta = timedelta(seconds=10)
    #: Stream entries idle this long on a consumer are taken over.
    pending_idle_ms: int = 60_000
    max_deliveries: int = 5
    #: How far back the first pass (with no earlier pass on record) looks.
    first_lookback: timedelta = timedelta(days=1)
    #: Each pass re-reads this much before the previous pass's start, for clock skew and
    #: transactions that committed late.
    overlap: timedelta = timedelta(minutes=1)
    batch: int = 1000


@dataclass
class PassSummary:
    pass_id: int
    started_at: datetime
    duration_ms: float
    repairs: dict[str, int] = field(default_factory=dict)
    #: A search filled its batch: the next pass goes on from where this one looked.
    more_to_repair: bool = False

    @property
    def total(self) -> int:
        return sum(self.repairs.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass_id": self.pass_id,
            "started_at": self.started_at.isoformat(),
            "duration_ms": round(self.duration_ms, 2),
            "repairs": dict(self.repairs),
            "total": self.total,
            "more_to_repair": self.more_to_repair,
        }


class Reconciler:
    def __init__(
        self,
        engine: Engine,
        transport: StreamTransport | None,
        keys: StreamKeys,
        config: ReconcilerConfig | None = None,
        host: str | None = None,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.keys = keys
        self.config = config or ReconcilerConfig()
        self.host = host or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.source = f"reconciler:{self.host}"
        self.publisher = Publisher(transport, keys) if transport is not None else None

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event, every_seconds: float = 5.0) -> None:
        log_event("reconciler.started", host=self.host, every_seconds=every_seconds)
        while not stop.is_set():
            try:
                summary = self.run_pass()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log_event("reconciler.unavailable", logging.WARNING, error=str(exc)[:200])
            else:
                if summary.total:
                    log_event("reconciler.repaired", logging.WARNING, **summary.as_dict())
            stop.wait(every_seconds)
        log_event("reconciler.stopped", host=self.host)

    # -- one pass --------------------------------------------------------------------------

    def run_pass(self) -> PassSummary:
        cfg = self.config
        clock = time.perf_counter()
        now = utcnow()
        previous = in_transaction(self.engine, resume_point)
        pass_id = in_transaction(self.engine, lambda c: start_pass(c, self.host, now))
        looked_from = previous or now - cfg.first_lookback
        since = looked_from - cfg.overlap
        counts: Counter[str] = Counter()
        to_publish: list[ReadyStep] = []

        if self.transport is not None:
            counts["streams_reset"] += self._check_streams(pass_id, first=previous is None)

        expired = in_transaction(self.engine, lambda c: expire_leases(c, now, cfg.batch, pass_id))
        counts["lease_expired"] += len(expired)
        for result in expired:
            telemetry.completion_recorded(self.engine, result, source="reconciler")

        counts["callback_lease_expired"] += len(
            in_transaction(
                self.engine, lambda c: expire_callback_leases(c, now, cfg.batch, pass_id)
            )
        )

        counts["await_expired"] += len(
            in_transaction(self.engine, lambda c: expire_awaits(c, now, cfg.batch, pass_id))
        )

        promoted = in_transaction(
            self.engine,
            lambda c: promote_due_retries(c, now, cfg.batch, pass_id, overdue=cfg.overdue_retry),
        )
        counts["retry_due"] += len(promoted)

        dropped, dropped_full = self._dropped_events(since, now, pass_id)
        released, releases_full = self._releases(since, now, pass_id)
        counts["dropped_event"] += dropped
        counts["release"] += released
        # A windowed search that filled its batch left findings behind: the next pass
        # must look again from `looked_from`, not from this pass's start.
        left_behind = dropped_full or releases_full

        stale = in_transaction(
            self.engine,
            lambda c: redispatch_stale(c, now, cfg.redispatch_after, cfg.batch, pass_id),
        )
        counts["redispatch"] += len(stale)
        to_publish.extend(stale)

        if self.transport is not None:
            counts["pending_entry"] += self._pending_entries(pass_id)

        # Without streams nothing can be published, so nothing may be marked dispatched.
        undispatched: tuple[ReadyStep, ...] = ()
        if self.transport is not None:
            undispatched = in_transaction(
                self.engine, lambda c: dispatch_undispatched(c, utcnow(), cfg.batch)
            )
        to_publish.extend(undispatched)
        self._publish(to_publish)

        duration = (time.perf_counter() - clock) * 1000
        repairs = {k: v for k, v in counts.items() if v}
        summary = PassSummary(pass_id, now, duration, repairs, more_to_repair=left_behind)
        in_transaction(
            self.engine,
            lambda c: finish_pass(
                c,
                pass_id,
                {
                    "repairs": repairs,
                    "dispatched": len(undispatched),
                    "duration_ms": round(duration, 2),
                    **({RESUME_FROM: looked_from.isoformat()} if left_behind else {}),
                },
                utcnow(),
            ),
        )
        telemetry.repaired(repairs, source="reconciler")
        return summary

    # -- the repairs that need more than one query ------------------------------------

    def _dropped_events(self, since: datetime, now: datetime, pass_id: int) -> tuple[int, bool]:
        """Repair dropped events; (repaired, whether the search filled its batch)."""
        cfg = self.config
        until = now - cfg.dropped_after
        candidates = in_transaction(
            self.engine,
            lambda c: find_dropped_events(c, since - cfg.dropped_after, until, cfg.batch),
        )
        repaired = 0
        for wf, step, attempt, status in candidates:
            done = in_transaction(
                self.engine,
                partial(
                    repair_dropped_event,
                    workflow_id=wf,
                    step=step,
                    attempt=attempt,
                    status=status,
                    now=now,
                    pass_id=pass_id,
                    source=self.source,
                ),
            )
            repaired += done is not None
        return repaired, len(candidates) >= cfg.batch

    def _releases(self, since: datetime, now: datetime, pass_id: int) -> tuple[int, bool]:
        """Apply owed releases; (steps changed, whether the search filled its batch)."""
        pairs = in_transaction(
            self.engine, lambda c: find_unapplied_releases(c, since, self.config.batch)
        )
        changed = 0
        for wf, parent in pairs:
            changed += len(
                in_transaction(
                    self.engine,
                    partial(
                        repair_releases, workflow_id=wf, parent=parent, now=now, pass_id=pass_id
                    ),
                )
            )
        return changed, len(pairs) >= self.config.batch

    def _check_streams(self, pass_id: int, first: bool) -> int:
        """Recreate groups; if a partition lost its data, re-dispatch everything available.

        One epoch marker per partition, because on a Redis Cluster a shard can restart
        empty while the others keep theirs. The re-dispatch is not narrowed to the lost
        partition's workflows: a step whose message survived elsewhere gets a duplicate,
        which its claim refuses and records — cheaper than hashing every id in SQL.
        """
        assert self.transport is not None
        transport = self.transport
        keys = self.keys
        fresh = [
            p
            for p in keys.partition_ids
            if retrying(partial(transport.claim_marker, keys.epoch_key(p), self.host))
        ]
        queues = in_transaction(self.engine, live_queues)
        for stream in keys.all_completions():
            retrying(partial(transport.ensure_group, stream, keys.completion_group))
        for stream in keys.ready_streams(queues):
            retrying(partial(transport.ensure_group, stream, keys.workers_group))
        if not fresh or first:
            return 0

        lost = ",".join(map(str, fresh))

        def reset(conn: Connection) -> list[ReadyStep]:
            steps = undispatch_all_available(conn)
            for r in steps:
                record_recovery(
                    conn,
                    workflow_id=r.workflow_id,
                    step=r.step,
                    repair="streams_reset",
                    reason=f"Redis lost the data of stream partition(s) {lost} (their epoch "
                    "markers were gone): dispatching again from the ledger",
                    now=utcnow(),
                    pass_id=pass_id,
                )
            return steps

        steps = in_transaction(self.engine, reset)
        log_event(
            "reconciler.streams_reset", logging.WARNING, redispatch=len(steps), partitions=fresh
        )
        return max(1, len(steps))

    def _pending_entries(self, pass_id: int) -> int:
        """Entries idle on some consumer past the threshold: the reconciler takes them."""
        assert self.transport is not None
        cfg = self.config
        name = f"reconciler-{self.host}"
        handled = 0
        consumer = CompletionConsumer(
            self.engine,
            self.transport,
            self.keys,
            ConsumerConfig(
                name=name, claim_idle_ms=cfg.pending_idle_ms, max_deliveries=cfg.max_deliveries
            ),
        )
        before = consumer.stats.consumed + consumer.stats.dead_lettered
        consumer.take_over_idle()
        handled += consumer.stats.consumed + consumer.stats.dead_lettered - before
        queues = in_transaction(self.engine, live_queues)
        for stream in self.keys.ready_streams(queues):
            result = self.transport.autoclaim(
                stream, self.keys.workers_group, name, cfg.pending_idle_ms, cfg.batch
            )
            for claimed in result.claimed:
                self._hand_back_ready(claimed.entry, claimed.deliveries, pass_id)
                handled += 1
        return handled

    def _hand_back_ready(self, entry: Entry, deliveries: int, pass_id: int) -> None:
        """A ready entry nobody finished handling: let the dispatcher send its step again."""
        assert self.transport is not None
        if deliveries > self.config.max_deliveries:
            dead_letter(
                self.engine,
                self.transport,
                self.keys,
                group=self.keys.workers_group,
                entry=entry,
                reason="delivered too many times",
                deliveries=deliveries,
                source=self.source,
            )
            return
        try:
            msg = decode_ready(entry.fields)
        except MalformedEntry as exc:
            dead_letter(
                self.engine,
                self.transport,
                self.keys,
                group=self.keys.workers_group,
                entry=entry,
                reason=exc.problem,
                deliveries=deliveries,
                source=self.source,
            )
            return

        def hand_back(conn: Connection) -> None:
            s = t.steps
            if msg.job == CALLBACK_JOB:
                state = callback_state(conn, msg.workflow_id)
            else:
                state = conn.execute(
                    select(s.c.state).where(
                        s.c.workflow_id == msg.workflow_id, s.c.name == msg.step
                    )
                ).scalar()
            if state == "available":
                ready = ReadyStep(msg.workflow_id, msg.step, msg.queue, job=msg.job)
                unmark_dispatched(conn, [ready])
            record_recovery(
                conn,
                workflow_id=msg.workflow_id,
                step=msg.step,
                repair="pending_entry",
                reason=f"ready entry {entry.id} idle on a consumer for over "
                f"{self.config.pending_idle_ms} ms; step is {state}",
                now=utcnow(),
                pass_id=pass_id,
                evidence={"stream": entry.stream, "id": entry.id, "deliveries": deliveries},
            )

        in_transaction(self.engine, hand_back)
        transport = self.transport
        retrying(lambda: transport.ack(entry.stream, self.keys.workers_group, [entry.id]))

    def _publish(self, ready: Sequence[ReadyStep]) -> None:
        """Publish re-dispatched steps; if that cannot be done here (no streams, or Redis
        refused), hand them to the dispatcher by marking them undispatched."""
        if not ready:
            return
        if self.publisher is None or not self.publisher.publish_ready(ready_messages(list(ready))):
            in_transaction(self.engine, lambda c: unmark_dispatched(c, ready))
