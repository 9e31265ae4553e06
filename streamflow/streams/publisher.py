"""Publishing completion events and ready messages after the ledger committed.

A publish is an optimisation, never a commitment: by the time it runs the ledger write it
announces has already committed, and the dispatcher and reconciler find anything never
published. So a failed publish — Redis down, restarting, out of memory, any error from
the transport — must not fail the caller (which would make a recorded outcome look like a
failure). It logs one structured warning line on the `streamflow.streams` logger (event
`stream.publish_failed`, fields in `sf_fields` as `streamflow.logs` expects) and returns
False.

Routing: every message about a workflow goes to that workflow's partition
(`StreamKeys.partition_of`), so with N partitions on a Redis Cluster the load spreads
over the shards while one workflow's events stay in one stream, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from streamflow.streams.codec import CompletionEvent, ReadyMessage, encode
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import Fields, StreamTransport

logger = logging.getLogger("streamflow.streams")


class Publisher:
    def __init__(self, transport: StreamTransport, keys: StreamKeys) -> None:
        self.transport = transport
        self.keys = keys

    @classmethod
    def connect(cls, redis_url: str | None = None) -> Publisher:
        """A publisher to the Redis at `redis_url` (default: STREAMFLOW_REDIS_URL), with
        the stream names every Streamflow process of the deployment uses
        (STREAMFLOW_STREAM_PREFIX, STREAMFLOW_STREAM_PARTITIONS). For
        `Workflow.insert(engine, publisher=...)`. Connects lazily: a Redis that is down
        shows as publishes that fail (and fall back), not here."""
        from streamflow.config import Settings
        from streamflow.streams.keys import parse_partitions
        from streamflow.streams.transport import connect

        settings = Settings()
        url = redis_url or settings.redis_url
        if url is None:
            raise ValueError(
                "Publisher.connect needs a Redis URL: pass one or set STREAMFLOW_REDIS_URL"
            )
        keys = StreamKeys(
            prefix=settings.stream_prefix, partitions=parse_partitions(settings.stream_partitions)
        )
        return cls(connect(url), keys)

    def publish_completion(self, event: CompletionEvent) -> bool:
        """XADD `event` to the completion stream; True on success, False (logged) if not."""
        # Encoding stays outside the guard: a bad event is a bug to surface, not an outage.
        item = (self.keys.completions_for(event.workflow_id), encode(event))
        return self._publish("completion", [item], event.workflow_id, event.step)

    def publish_completions(self, events: Sequence[CompletionEvent]) -> bool:
        """XADD each event to its completion stream, in order, in one round trip."""
        if not events:
            return True
        items = [(self.keys.completions_for(e.workflow_id), encode(e)) for e in events]
        return self._publish("completion", items, events[0].workflow_id, events[0].step)

    def publish_ready(self, messages: Sequence[ReadyMessage]) -> bool:
        """XADD each message to its queue's ready stream in one round trip."""
        if not messages:
            return True
        items = [(self.keys.ready_for(m.queue, m.workflow_id), encode(m)) for m in messages]
        return self._publish("ready", items, messages[0].workflow_id, messages[0].step)

    def _publish(
        self, kind: str, items: list[tuple[str, Fields]], workflow_id: str, step: str
    ) -> bool:
        try:
            if len(items) == 1:
                self.transport.add(*items[0])
            else:
                self.transport.add_many(items)
        # Deliberately broad: whatever the transport raises (redis errors, OSError from a
        # socket, a chaos wrapper's injected fault), the committed ledger write stands.
        except Exception as exc:
            fields = {
                "kind": kind,
                "streams": sorted({stream for stream, _ in items}),
                "messages": len(items),
                # The first message's identity: enough to find the rest in the ledger.
                "workflow_id": workflow_id,
                "step": step,
                "error": type(exc).__name__,
                "detail": str(exc).replace("\n", " ")[:200],
            }
            logger.warning("stream.publish_failed", extra={"sf_fields": fields})
            return False
        return True
