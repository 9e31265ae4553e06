"""The completion consumer: one member of the consumer group on the completion stream.

Reads events in batches, consumes a whole batch in one ledger transaction, publishes the
children it dispatched, and only then acknowledges: an event is never lost between the
stream and the ledger. Entries a dead consumer left pending are taken over after an idle
time; one delivered too often goes to the dead-letter stream, recorded, not retried
forever.

With N stream partitions every consumer reads every partition's completion stream in
the one group: Redis hands each entry to one member, so adding a consumer process
spreads the events with no assignment of partitions of our own.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Engine

from ledger.consume import CompletionEventView, Consumed, consume_completions
from ledger.transitions import unmark_dispatched
from streamflow import telemetry
from streamflow.engine.common import in_transaction, now_ms, ready_messages, utcnow
from streamflow.engine.deadletter import dead_letter
from streamflow.engine.retrying import is_transient, retrying
from streamflow.logs import log_event
from streamflow.streams.codec import MalformedEntry, decode_completion
from streamflow.streams.keys import StreamKeys
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import Entry, StreamTransport


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    name: str
    batch: int = 200
    block_ms: int = 500
    #: Entries pending this long on a consumer are taken over (it probably died).
    claim_idle_ms: int = 30_000
    #: Delivered more often than this, an entry is dead-lettered.
    max_deliveries: int = 5
    #: After a read that did not fill the batch, wait this long, then take the events that
    #: arrived meanwhile with one more read, so one transaction accounts for many. Nothing
    #: waits on the consumer in the normal path (the worker's own commit released and
    #: dispatched the children), so trading these milliseconds for far fewer commits and
    #: reads per step is cheap. 0: no waiting.
    linger_ms: int = 50


@dataclass
class ConsumerStats:
    consumed: int = 0
    duplicate: int = 0
    late: int = 0
    unmatched: int = 0
    dead_lettered: int = 0
    dispatched: int = 0
    repaired: int = 0


class CompletionConsumer:
    def __init__(
        self,
        engine: Engine,
        transport: StreamTransport,
        keys: StreamKeys,
        config: ConsumerConfig,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.keys = keys
        self.config = config
        self.publisher = Publisher(transport, keys)
        self.stats = ConsumerStats()

    def run(self, stop: threading.Event) -> None:
        streams, group = self.keys.all_completions(), self.keys.completion_group
        for stream in streams:
            retrying(partial(self.transport.ensure_group, stream, group))
        log_event(
            "consumer.started",
            consumer=self.config.name,
            stream=streams[0],
            partitions=self.keys.partitions,
        )
        next_takeover = 0.0
        while not stop.is_set():
            try:
                if utcnow().timestamp() >= next_takeover:
                    self.take_over_idle()
                    next_takeover = utcnow().timestamp() + self.config.claim_idle_ms / 2000
                entries = self.transport.read_group(
                    group, self.config.name, streams, self.config.batch, self.config.block_ms
                )
                if entries and len(entries) < self.config.batch and self.config.linger_ms > 0:
                    entries += self._linger(streams, self.config.batch - len(entries), stop)
                if entries:
                    # Unacknowledged entries of a failed batch stay pending on this
                    # consumer and are taken over again once idle: nothing is lost.
                    self.process(entries)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log_event(
                    "consumer.unavailable",
                    logging.WARNING,
                    consumer=self.config.name,
                    error=str(exc)[:200],
                )
                stop.wait(1.0)
        log_event("consumer.stopped", consumer=self.config.name, **vars(self.stats))

    def _linger(self, streams: list[str], room: int, stop: threading.Event) -> list[Entry]:
        """More entries for a batch that is not full: wait `linger_ms` (less if stopped),
        then take what arrived meanwhile in one read. (Reading as each event arrived cost
        a round trip per event or two, as the worker's outbox sends them.)"""
        stop.wait(self.config.linger_ms / 1000)
        return self.transport.read_group(
            self.keys.completion_group, self.config.name, streams, room, 0
        )

    def take_over_idle(self) -> None:
        group = self.keys.completion_group
        keep: list[Entry] = []
        for stream in self.keys.all_completions():
            result = self.transport.autoclaim(
                stream, group, self.config.name, self.config.claim_idle_ms, self.config.batch
            )
            for claimed in result.claimed:
                if claimed.deliveries > self.config.max_deliveries:
                    self._dead_letter(claimed.entry, "delivered too many times", claimed.deliveries)
                else:
                    keep.append(claimed.entry)
        if keep:
            log_event(
                "consumer.took_over_idle_entries", consumer=self.config.name, entries=len(keep)
            )
            self.process(keep)

    def process(self, entries: list[Entry]) -> None:
        """Consume a batch: one ledger transaction, then publish, then acknowledge.

        If the batch fails for a reason that is not a passing outage, its entries are
        consumed one by one so a single poisonous entry is dead-lettered (and recorded)
        instead of stopping the consumer or holding the others back.
        """
        decoded: list[tuple[Entry, CompletionEventView]] = []
        #: When each event was published (telemetry's event_hop_ms), by key.
        sent: dict[str, int] = {}
        for entry in entries:
            try:
                ev = decode_completion(entry.fields)
            except MalformedEntry as exc:
                self._dead_letter(entry, exc.problem, 1)
                continue
            view = CompletionEventView(
                ev.workflow_id, ev.step, ev.status.value, ev.attempt, ev.idempotency_key
            )
            decoded.append((entry, view))
            sent[view.idempotency_key] = ev.at_ms
        if not decoded:
            return
        try:
            self._consume([view for _, view in decoded], sent)
        except Exception as exc:
            if is_transient(exc):
                raise
            for entry, view in decoded:
                try:
                    self._consume([view], sent)
                except Exception as one:
                    if is_transient(one):
                        raise
                    self._poison(entry, one)
                    continue
                self._ack([entry])
            return
        self._ack([entry for entry, _ in decoded])

    def _consume(self, views: list[CompletionEventView], sent: dict[str, int]) -> None:
        source = f"consumer:{self.config.name}"
        results = in_transaction(
            self.engine, lambda conn: consume_completions(conn, views, utcnow(), source)
        )
        self._publish(results)
        if telemetry.enabled():
            consumed_at = now_ms()
            for c in results:
                at = sent.get(c.event.idempotency_key)
                telemetry.evidence_recorded(
                    kind="event",
                    classification=c.classification,
                    status=c.event.status,
                    source="consumer",
                    event_hop_ms=None if at is None else consumed_at - at,
                )
                telemetry.repaired({"release": len(c.repaired)}, source="consumer")

    def _ack(self, entries: list[Entry]) -> None:
        """XACK per stream: a batch may hold entries of several partitions."""
        by_stream: defaultdict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_stream[entry.stream].append(entry.id)
        for stream, ids in by_stream.items():
            retrying(partial(self.transport.ack, stream, self.keys.completion_group, ids))

    def _poison(self, entry: Entry, exc: Exception) -> None:
        log_event("consumer.entry_failed", logging.ERROR, entry=entry.id, exc_info=True)
        self._dead_letter(entry, f"ledger refused it: {type(exc).__name__}", 1)

    def _publish(self, results: list[Consumed]) -> None:
        ready = [r for c in results for r in c.ready]
        for c in results:
            count = getattr(self.stats, c.classification, None)
            if count is not None:
                setattr(self.stats, c.classification, count + 1)
            self.stats.repaired += len(c.repaired)
            if c.classification != "consumed":
                log_event(
                    "consumer.event_" + c.classification,
                    workflow_id=c.event.workflow_id,
                    step=c.event.step,
                    attempt=c.event.attempt,
                )
        if not ready:
            return
        if self.publisher.publish_ready(ready_messages(ready)):
            self.stats.dispatched += len(ready)
        else:
            in_transaction(self.engine, lambda conn: unmark_dispatched(conn, ready))

    def _dead_letter(self, entry: Entry, reason: str, deliveries: int) -> None:
        dead_letter(
            self.engine,
            self.transport,
            self.keys,
            group=self.keys.completion_group,
            entry=entry,
            reason=reason,
            deliveries=deliveries,
            source=f"consumer:{self.config.name}",
        )
        self.stats.dead_lettered += 1
