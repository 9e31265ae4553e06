"""Dead-lettering: an entry that cannot be processed is moved aside and recorded."""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine

from ledger.evidence import record_evidence
from streamflow.engine.common import in_transaction, utcnow
from streamflow.engine.retrying import retrying
from streamflow.logs import log_event
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import Entry, StreamTransport


def dead_letter(
    engine: Engine,
    transport: StreamTransport,
    keys: StreamKeys,
    *,
    group: str,
    entry: Entry,
    reason: str,
    deliveries: int,
    source: str,
) -> None:
    """Copy `entry` to the dead-letter stream, acknowledge it, and keep evidence of it."""
    # The dead-letter stream of the entry's own partition: the copy and the XACK are one
    # MULTI, which a Redis Cluster allows only within one slot.
    dead_stream = keys.dead_letter_for(entry.stream)
    retrying(lambda: transport.dead_letter(entry, group, dead_stream, reason, deliveries))

    def record(conn: Connection) -> None:
        record_evidence(
            conn,
            workflow_id=entry.fields.get("workflow_id", "")[:32] or "-",
            step=(entry.fields.get("step") or None),
            kind="event" if group == keys.completion_group else "delivery",
            classification="dead_letter",
            source=source,
            now=utcnow(),
            reason=reason[:60],
            payload={
                "stream": entry.stream,
                "id": entry.id,
                "deliveries": deliveries,
                "fields": dict(entry.fields),
            },
        )

    in_transaction(engine, record)
    log_event(
        "stream.dead_lettered",
        logging.WARNING,
        stream=entry.stream,
        entry=entry.id,
        reason=reason,
        deliveries=deliveries,
        source=source,
    )
