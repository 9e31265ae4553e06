"""The stream transport: the one seam between the engine and Redis Streams.

Everything the engine does with streams goes through `StreamTransport`, so a test or the
chaos suite can wrap it to drop, duplicate, delay or replay messages without patching
internals. `RedisTransport` adapts a redis-py client (a real server, a Redis Cluster
through `RedisCluster`, or fakeredis for the embedded default); `connect()` builds one
from a URL.

Redis Cluster: every command the engine sends touches one hash tag (see `keys`), so
MULTI pipelines, XAUTOCLAIM and XTRIM work unchanged — redis-py routes single-slot
commands by key and runs a MULTI pipeline on the node owning its one slot. XREADGROUP is
different: a read over several partitions spans several slots, which Cluster refuses, and
redis-py learns the keys of XREADGROUP (a "movable keys" command) by asking a node with
COMMAND GETKEYS on every call. So in cluster mode reads are sent per slot, straight to
the node owning it (see `_read_sharded`).

Needs Redis >= 7.0: XAUTOCLAIM's third reply element (ids it found trimmed) and XTRIM
MINID are relied on.

Errors: `redis.exceptions.ConnectionError` and `TimeoutError` (Redis down or restarting)
propagate unchanged — callers retry with backoff. Only the "no such group" family is
handled here, because after a restart without persistence it is the normal state of
affairs rather than a fault: the group is recreated and the ledger re-drives what was lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, ResponseError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from streamflow.streams.cluster import is_cluster_url, parse_cluster_url

logger = logging.getLogger("streamflow.streams")


def _warn(event: str, **fields: Any) -> None:
    # The project's log convention (streamflow.logs): the message is a dotted event name
    # and the fields ride in `sf_fields`, which the CLI's formatter turns into one JSON line.
    logger.warning(event, extra={"sf_fields": fields})


#: Stream entry fields: flat string -> string maps.
Fields = dict[str, str]

_MAX_SEQ = 2**64 - 1
# Emulating BLOCK where the server answered early (see `read_group`): how often to look
# again, and how early an empty answer must be to count as early.
_POLL_INTERVAL_S = 0.01
_EARLY_REPLY_S = 0.005
#: Dead-letter entries kept in Redis (approximately); the ledger keeps them all.
DEAD_LETTER_MAXLEN = 10_000
#: Cluster reads: the longest one blocking read on one slot waits before every slot is
#: polled again. An entry in another slot waits at most this long to be seen when idle.
CLUSTER_BLOCK_SLICE_MS = 50

#: The clients `RedisTransport` adapts.
Client = redis.Redis | RedisCluster
#: What a read of one slot raises when the shard serving it is down or failing over.
_SHARD_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as delivered to a consumer."""

    stream: str
    id: str
    fields: Fields


@dataclass(frozen=True, slots=True)
class ClaimedEntry:
    """An entry taken over by XAUTOCLAIM."""

    entry: Entry
    #: How many times the entry has been delivered, this claim included. The engine
    #: dead-letters entries past a threshold instead of retrying poison forever.
    deliveries: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: tuple[ClaimedEntry, ...] = ()
    #: Ids that were pending but whose entries are gone from the stream (trimmed or
    #: deleted). They are no longer pending when this returns; the ledger recovers them.
    deleted_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PendingSummary:
    count: int
    lowest_id: str | None


class StreamTransport(Protocol):
    def add(self, stream: str, fields: Fields) -> str:
        """XADD; returns the new entry id."""
        ...

    def add_many(self, items: Sequence[tuple[str, Fields]]) -> list[str]:
        """Several XADDs in one round trip (not atomic); returns the ids in order."""
        ...

    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> bool:
        """XGROUP CREATE ... MKSTREAM; False if the group already existed (BUSYGROUP)."""
        ...

    def read_group(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int
    ) -> list[Entry]:
        """XREADGROUP for new entries ('>'), recreating a missing group (NOGROUP) once.

        Returns at most `count` entries, from any of `streams`. Waits up to block_ms for
        the first entry; block_ms <= 0 does not wait at all.
        """
        ...

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        """XACK; returns how many were pending. Acking nothing or a missing group is 0."""
        ...

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> ClaimResult:
        """XAUTOCLAIM up to `count` entries idle for min_idle_ms, with delivery counts."""
        ...

    def pending_summary(self, stream: str, group: str) -> PendingSummary:
        """XPENDING summary; a missing stream or group has nothing pending."""
        ...

    def trim_acknowledged(self, stream: str, groups: Sequence[str]) -> int:
        """Trim entries every group has acknowledged (XTRIM MINID); returns entries removed."""
        ...

    def dead_letter(
        self, entry: Entry, group: str, dead_stream: str, reason: str, deliveries: int
    ) -> str:
        """Copy `entry` to `dead_stream` with why, and XACK it, atomically; returns the new id."""
        ...

    def stream_length(self, stream: str) -> int:
        """XLEN; 0 for a missing stream."""
        ...

    def ping(self) -> None:
        """Raise if the server cannot be reached."""
        ...

    def claim_marker(self, key: str, value: str) -> bool:
        """SET key value NX: True if this call created it (the server had no such key)."""
        ...


# -- stream ids --------------------------------------------------------------------------


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest id greater than `entry_id`."""
    ms, seq = parse_id(entry_id)
    return f"{ms + 1}-0" if seq == _MAX_SEQ else f"{ms}-{seq + 1}"


def _min_id(ids: Sequence[str]) -> str:
    return min(ids, key=parse_id)


def _wire(fields: Fields) -> dict[FieldT, EncodableT]:
    # A copy typed as redis-py wants it (dict is invariant in its key and value types).
    return dict(fields.items())


# -- error classification ----------------------------------------------------------------


def _is_missing_group(exc: ResponseError) -> bool:
    message = str(exc)
    # Real Redis answers XREADGROUP on a missing key or group with NOGROUP. fakeredis
    # answers a missing *key* with XGROUP's "requires the key to exist" error instead.
    return message.startswith("NOGROUP") or "requires the key to exist" in message


def _is_busy_group(exc: ResponseError) -> bool:
    return "BUSYGROUP" in str(exc)


def _is_missing_key(exc: ResponseError) -> bool:
    return "no such key" in str(exc).lower()


# -- the adapter --------------------------------------------------------------------------


class RedisTransport:
    """`StreamTransport` over a sync redis-py client built with `decode_responses=True`."""

    def __init__(
        self,
        client: Client,
        *,
        max_block_ms: int | None = None,
        on_group_recreated: Callable[[str, str], None] | None = None,
    ) -> None:
        #: The redis-py client (exposed for tests and operators' tooling).
        self.client = client
        #: Upper bound on BLOCK: a read blocked longer than the client's socket timeout
        #: would be cut off as a TimeoutError, so `connect()` sets this below it.
        self.max_block_ms = max_block_ms
        #: Called with (stream, group) after a missing group was recreated, so the engine
        #: can re-drive from the ledger at once rather than at its next reconcile.
        self.on_group_recreated = on_group_recreated
        # XAUTOCLAIM cursors per (stream, group): a PEL whose head is busy with live
        # consumers is still scanned past on later calls. Only a hint, so no lock.
        self._claim_cursors: dict[tuple[str, str], str] = {}
        #: Cluster mode: reads go per slot (see `_read_sharded`).
        self.cluster = isinstance(client, RedisCluster)
        # Which slot group a sharded read blocks on next; rotates so none starves.
        self._rotation = 0
        # XREADGROUP's COUNT is per stream, so a read over several streams (partitions,
        # queues) can deliver more than the caller asked for. The excess is already
        # pending on the consumer; it is kept here, per (group, consumer), and handed out
        # first by the next read, so `read_group` never returns more than `count`.
        self._overflow: dict[tuple[str, str], deque[Entry]] = {}
        self._overflow_lock = threading.Lock()

    def add(self, stream: str, fields: Fields) -> str:
        return str(self.client.xadd(stream, _wire(fields)))

    def add_many(self, items: Sequence[tuple[str, Fields]]) -> list[str]:
        if not items:
            return []
        pipe = self.client.pipeline(transaction=False)
        for stream, fields in items:
            pipe.xadd(stream, _wire(fields))
        return [str(entry_id) for entry_id in pipe.execute()]

    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> bool:
        # Start at "0", not "$": a group created after entries arrived (a consumer started
        # after the dispatcher, or a restart where a publisher recreated the stream first)
        # must still see them. Extra deliveries are harmless; skipped ones cost latency.
        try:
            self.client.xgroup_create(stream, group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if _is_busy_group(exc):
                return False
            raise
        return True

    def read_group(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int
    ) -> list[Entry]:
        """New entries for `consumer`, waiting up to block_ms for the first one.

        `block_ms <= 0` means do not block (Redis' BLOCK 0 would wait forever, past any
        socket timeout). A block above `max_block_ms` is shortened to it.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if not streams:
            return []
        held = self._take_overflow(group, consumer, streams, count)
        if held:
            return held
        entries = self._read_new(group, consumer, streams, count, block_ms)
        if len(entries) > count:
            with self._overflow_lock:
                self._overflow.setdefault((group, consumer), deque()).extend(entries[count:])
            entries = entries[:count]
        return entries

    def _take_overflow(
        self, group: str, consumer: str, streams: Sequence[str], count: int
    ) -> list[Entry]:
        with self._overflow_lock:
            held = self._overflow.get((group, consumer))
            if not held:
                return []
            wanted = set(streams)
            out = [e for e in held if e.stream in wanted][:count]
            taken = {id(e) for e in out}
            self._overflow[(group, consumer)] = deque(e for e in held if id(e) not in taken)
            return out

    def _read_new(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int
    ) -> list[Entry]:
        block: int | None = block_ms if block_ms > 0 else None
        if block is not None and self.max_block_ms is not None:
            block = min(block, self.max_block_ms)
        if self.cluster:
            return self._read_sharded(group, consumer, streams, count, block)
        started = time.monotonic()
        entries = self._read_once(group, consumer, streams, count, block)
        if entries or block is None:
            return entries
        # fakeredis (2.40) answers XREADGROUP with COUNT and BLOCK at once when nothing is
        # there, instead of waiting: without this the embedded default's readers would
        # spin. Real Redis only answers empty once the block time is up, so this loop does
        # not run against it.
        deadline = started + block / 1000
        while not entries:
            remaining = deadline - time.monotonic()
            if remaining <= _EARLY_REPLY_S:
                break
            time.sleep(min(_POLL_INTERVAL_S, remaining))
            entries = self._read_once(group, consumer, streams, count, None)
        return entries

    def _read_sharded(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block: int | None
    ) -> list[Entry]:
        """Cluster reads: one XREADGROUP per slot, `count` entries in all.

        First a non-blocking read of every slot, starting at a rotating one so a busy
        slot cannot starve the others; then, if all were empty, a short blocking read on
        one slot that answered (the next in rotation) and round again, until `block` ms
        have passed. Idle, a reader sends about (slots + 1) commands per
        `CLUSTER_BLOCK_SLICE_MS`.

        A shard that is down fails only its own slots' reads: the others are still read,
        and the error propagates only when no slot could be read at all.
        """
        slots: dict[int, list[str]] = {}
        for stream in streams:
            slots.setdefault(self._slot(stream), []).append(stream)
        groups = list(slots.values())
        deadline = time.monotonic() + (block or 0) / 1000
        while True:
            start = self._rotation
            self._rotation += 1
            entries: list[Entry] = []
            answered: list[list[str]] = []
            failure: Exception | None = None
            for i in range(len(groups)):
                batch = groups[(start + i) % len(groups)]
                try:
                    entries += self._read_once(group, consumer, batch, count - len(entries), None)
                except _SHARD_DOWN as exc:
                    failure = exc
                    continue
                answered.append(batch)
                if len(entries) >= count:
                    break
            if entries:
                return entries
            if not answered and failure is not None:
                raise failure
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if block is None or remaining_ms < 1:
                return []
            wait = min(remaining_ms, CLUSTER_BLOCK_SLICE_MS)
            entries = self._read_once(group, consumer, answered[start % len(answered)], count, wait)
            if entries:
                return entries

    def _slot(self, key: str) -> int:
        assert isinstance(self.client, RedisCluster)
        return int(self.client.keyslot(key))  # type: ignore[no-untyped-call]

    def _xreadgroup(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block: int | None
    ) -> Any:
        if not isinstance(self.client, RedisCluster):
            request: dict[Any, Any] = dict.fromkeys(streams, ">")
            return self.client.xreadgroup(group, consumer, request, count=count, block=block)
        # Sent to the node owning the slot, so redis-py needs no COMMAND GETKEYS round
        # trip (to a node that may be the one down) to find out where it goes.
        args: list[Any] = ["GROUP", group, consumer, "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", *streams, *([">"] * len(streams))]
        node: ClusterNode = self.client.get_node_from_key(streams[0])  # type: ignore[no-untyped-call]
        return self.client.execute_command("XREADGROUP", *args, target_nodes=node)  # type: ignore[no-untyped-call]

    def _read_once(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block: int | None
    ) -> list[Entry]:
        try:
            reply = self._xreadgroup(group, consumer, streams, count, block)
        except ResponseError as exc:
            if not _is_missing_group(exc):
                raise
            # Redis restarted empty or was flushed. Recreate, then read once more; a second
            # NOGROUP (flushed again in between) propagates to the caller's retry.
            for stream in streams:
                if self.ensure_group(stream, group):
                    _warn("stream.group_recreated", stream=stream, group=group, consumer=consumer)
                    if self.on_group_recreated is not None:
                        self.on_group_recreated(stream, group)
            reply = self._xreadgroup(group, consumer, streams, count, block)
        return _entries(reply)

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        try:
            return int(self.client.xack(stream, group, *ids))
        except ResponseError as exc:
            if _is_missing_group(exc):
                return 0
            raise

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> ClaimResult:
        """Take over up to `count` entries idle at least `min_idle_ms`.

        At most two XAUTOCLAIM calls: one from where the last call stopped and, if that
        reached the end of the pending list short of `count`, one more from the start.
        Ids whose entries were trimmed come back in `deleted_ids`; Redis 7 has already
        dropped them from the pending list, and they are XACKed as well for servers that
        leave them there.
        """
        if count <= 0:
            return ClaimResult()
        cursor_key = (stream, group)
        start = self._claim_cursors.get(cursor_key, "0-0")
        pairs: list[tuple[str, Fields]] = []
        deleted: list[str] = []
        try:
            for _ in range(2):
                reply = self.client.xautoclaim(
                    stream, group, consumer, min_idle_ms, start, count=count - len(pairs)
                )
                cursor = str(reply[0])
                for entry_id, fields in reply[1]:
                    # Before Redis 7 a trimmed entry came back as nil with no id; skip it.
                    if entry_id is not None and fields is not None:
                        pairs.append((str(entry_id), dict(fields)))
                deleted.extend(str(i) for i in (reply[2] if len(reply) > 2 else []))
                self._claim_cursors[cursor_key] = cursor
                wrapped = cursor == "0-0"
                if len(pairs) >= count or not wrapped or start == "0-0":
                    break
                start = "0-0"
        except ResponseError as exc:
            if _is_missing_group(exc):
                self._claim_cursors.pop(cursor_key, None)
                return ClaimResult()
            raise
        if deleted:
            self.ack(stream, group, deleted)
            _warn(
                "stream.claimed_entries_trimmed",
                stream=stream,
                group=group,
                count=len(deleted),
                ids=deleted[:10],
            )
        claimed = self._with_delivery_counts(stream, group, consumer, pairs)
        return ClaimResult(tuple(claimed), tuple(deleted))

    def _with_delivery_counts(
        self, stream: str, group: str, consumer: str, pairs: list[tuple[str, Fields]]
    ) -> list[ClaimedEntry]:
        if not pairs:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in pairs:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        details = pipe.execute()
        claimed: list[ClaimedEntry] = []
        for (entry_id, fields), rows in zip(pairs, details, strict=True):
            # Acked, or claimed again by another consumer, between our two round trips:
            # it is no longer ours to process.
            if not rows or rows[0]["consumer"] != consumer:
                continue
            entry = Entry(stream, entry_id, fields)
            claimed.append(ClaimedEntry(entry, int(rows[0]["times_delivered"])))
        return claimed

    def pending_summary(self, stream: str, group: str) -> PendingSummary:
        try:
            summary = self.client.xpending(stream, group)
        except ResponseError as exc:
            if _is_missing_group(exc):
                return PendingSummary(0, None)
            raise
        lowest = summary["min"]
        return PendingSummary(int(summary["pending"]), str(lowest) if lowest else None)

    def trim_acknowledged(self, stream: str, groups: Sequence[str]) -> int:
        """Remove the entries below every group's lowest pending and undelivered entry.

        Per group the bound is its lowest pending id, or the id just after its
        last-delivered-id when nothing is pending; the stream is trimmed (exactly, with
        XTRIM MINID =) below the smallest bound. Group info and pending lists are read in
        one MULTI so they describe a single instant; afterwards deliveries only move bounds
        up and acks only remove pending ids, so the bound stays safe until the XTRIM runs.

        Nothing is trimmed when `groups` is empty or one of them does not exist yet: an
        unknown group's needs are unknown. Groups not named are not consulted. Not covered:
        a group created at "0" or moved back with XGROUP SETID after the bound was read.
        """
        if not groups:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.xinfo_groups(stream)
        for group in groups:
            pipe.xpending(stream, group)
        results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, ResponseError):
                if _is_missing_key(result) or _is_missing_group(result):
                    return 0
                raise result
        last_delivered = {str(info["name"]): str(info["last-delivered-id"]) for info in results[0]}
        bounds: list[str] = []
        for group, summary in zip(groups, results[1:], strict=True):
            if group not in last_delivered:
                return 0
            bound = next_id(last_delivered[group])
            pending, lowest = _pending_head(summary)
            if pending and lowest:
                bound = _min_id([bound, lowest])
            bounds.append(bound)
        return int(self.client.xtrim(stream, minid=_min_id(bounds), approximate=False))

    def dead_letter(
        self, entry: Entry, group: str, dead_stream: str, reason: str, deliveries: int
    ) -> str:
        """Move `entry` out of the way: copy it, with why, to `dead_stream`, then XACK it.

        One MULTI, so a crash leaves either both done or neither (the entry stays pending
        and is claimed again). The dead-letter stream has no readers' groups, so capping
        it with an approximate MAXLEN strands no pending references; the ledger records
        every dead-lettering as evidence, so the copy here is a convenience for operators.
        """
        fields: Fields = dict(entry.fields)
        fields.update(
            {
                "dl_stream": entry.stream,
                "dl_id": entry.id,
                "dl_group": group,
                "dl_reason": reason,
                "dl_deliveries": str(deliveries),
            }
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(dead_stream, _wire(fields), maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        pipe.xack(entry.stream, group, entry.id)
        new_id, acked = pipe.execute(raise_on_error=False)
        if isinstance(new_id, Exception):
            raise new_id
        # A group that vanished (Redis flushed since the read) has nothing pending to ack.
        if isinstance(acked, ResponseError) and not _is_missing_group(acked):
            raise acked
        return str(new_id)

    def stream_length(self, stream: str) -> int:
        return int(self.client.xlen(stream))

    def ping(self) -> None:
        self.client.ping()

    def claim_marker(self, key: str, value: str) -> bool:
        return bool(self.client.set(key, value, nx=True))


def _pending_head(summary: Any) -> tuple[int, str | None]:
    """(count, lowest id) of an XPENDING summary: parsed to a dict by redis-py, except
    inside a Cluster MULTI (redis-py 8.1), where it comes back as the raw reply
    [count, lowest, highest, consumers]."""
    if isinstance(summary, dict):
        count, lowest = summary["pending"], summary["min"]
    else:
        count, lowest = summary[0], summary[1]
    return int(count or 0), (str(lowest) if lowest else None)


def _entries(reply: Any) -> list[Entry]:
    """Flatten an XREADGROUP reply: a RESP2 list of [stream, entries] or a RESP3 dict."""
    if not reply:
        return []
    if isinstance(reply, dict):
        # RESP3: {stream: [[(id, fields), ...]]}
        per_stream = [(s, batch) for s, batches in reply.items() for batch in batches]
    else:
        per_stream = [(s, batch) for s, batch in reply]
    entries: list[Entry] = []
    for stream, batch in per_stream:
        for entry_id, fields in batch:
            if fields is not None:  # only history reads return deleted (nil) entries
                entries.append(Entry(str(stream), str(entry_id), dict(fields)))
    return entries


# -- construction --------------------------------------------------------------------------

#: Socket read timeout for `connect()`. Must exceed the longest BLOCK a reader uses, or
#: every idle XREADGROUP would end in a TimeoutError; `connect()` caps BLOCK below it.
DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: Room left between the longest BLOCK and the socket timeout, for the reply to arrive
#: (half the timeout when that is shorter).
BLOCK_MARGIN_MS = 2_000

_embedded_server: Any = None
_embedded_lock = threading.Lock()


def connect(
    url: str | None,
    *,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
    socket_connect_timeout: float = 2.0,
    health_check_interval: int = 15,
    retries: int = 1,
) -> RedisTransport:
    """A transport for `url`: `redis://`, `rediss://`, a cluster's `redis+cluster://`
    (see `streamflow.streams.cluster`), or None for the embedded default.

    None gives an in-process fakeredis server, one per process, shared by every
    transport `connect(None)` returns, so the dispatcher, consumers and workers of one
    `streamflow run` see the same streams. It lives and dies with the process.

    For real servers: redis-py uses hiredis for parsing when it is installed (it is a
    dependency). `retries` quick retries (tens of ms) absorb a pooled connection that went
    stale across a Redis restart; anything longer is the caller's tenacity loop, so an
    outage surfaces as ConnectionError in well under a second rather than being hidden.
    `health_check_interval` pings connections idle that long before reuse. Readers may
    block up to `socket_timeout` minus two seconds, or half of it when it is short (see
    `RedisTransport.max_block_ms`). A cluster nobody in the seed list answers for raises
    `redis.exceptions.ConnectionError`, like a standalone server that is down.
    """
    if url is None:
        return RedisTransport(_embedded_client())
    if not url.startswith(("redis://", "rediss://")) and not is_cluster_url(url):
        raise ValueError(
            "unsupported Redis URL scheme (want redis://, rediss:// or "
            f"redis+cluster://host:port[,host:port]): {url!r}"
        )
    if socket_timeout <= 0:
        raise ValueError(f"socket_timeout must be positive, got {socket_timeout}")
    timeout_ms = int(socket_timeout * 1000)
    max_block_ms = max(1, timeout_ms - min(BLOCK_MARGIN_MS, timeout_ms // 2))
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.02), retries),
    }
    client: Client
    if is_cluster_url(url):
        client = _cluster_client(url, options)
    else:
        client = redis.Redis.from_url(url, **options)
    return RedisTransport(client, max_block_ms=max_block_ms)


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    parsed = parse_cluster_url(url)
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],  # type: ignore[no-untyped-call]
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.ssl,
            # A process starting while one shard is down still starts: the partitions on
            # the other shards work, and the down one's commands fail (and are retried)
            # until it is back.
            require_full_coverage=False,
            **options,
        )
    except RedisClusterException as exc:
        # Raised when no seed node answers: the same kind of failure as a standalone
        # server that is down, so callers handle (and retry) it the same way.
        raise redis.exceptions.ConnectionError(f"Redis Cluster unreachable: {exc}") from exc


def _embedded_client() -> redis.Redis:
    # Imported here: only the embedded default needs fakeredis, and it is slow to import.
    import fakeredis

    global _embedded_server
    with _embedded_lock:
        if _embedded_server is None:
            # Version 7, as the real servers we support (XAUTOCLAIM's deleted-ids reply).
            _embedded_server = fakeredis.FakeServer(version=(7,))
    client: redis.Redis = fakeredis.FakeRedis(server=_embedded_server, decode_responses=True)
    return client
