"""Stream key and consumer-group names, and which partition a workflow's messages use.

Every key carries the prefix inside a Redis Cluster hash tag, as its first segment. With
one partition (the default) the names are exactly those of an unpartitioned deployment:

    {streamflow}:completions          the completion stream (one consumer group)
    {streamflow}:ready:<queue>        one ready stream per queue (one workers group)
    {streamflow}:dead                 the dead-letter stream (read by operators, not groups)
    {streamflow}:epoch                the reconciler's marker (gone: Redis lost its data)

With N > 1 partitions the partition goes inside the tag, so each partition is one slot
holding every key its readers touch together:

    {streamflow:7}:completions, {streamflow:7}:ready:emails, {streamflow:7}:dead, ...

Why the tag holds the prefix and the partition, not the stream name: Cluster refuses
multi-key commands across slots, and the engine needs several keys at once — a worker
reads all of one partition's queues in one XREADGROUP, dead-lettering is an XADD to
`dead` plus an XACK on the source stream in one MULTI (so `dead` is per partition too).

A workflow's messages all go to one partition, `partition_for(workflow_id, N)`: CRC-32
of the id, mod N. Stable across processes, machines and Python versions (never `hash()`,
which is salted per process). Every reader reads every partition through the consumer
groups, so which partition a message lands in decides which Cluster shard carries it,
never which process handles it.

Prefixes and group names may not contain braces (in a prefix they would end or nest the
tag) or whitespace (names show up in logs and `redis-cli` sessions, where it only causes
trouble). A prefix may not end in `:<digits>` either: `{app:3}` would be both prefix
`app:3` and partition 3 of prefix `app`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

DEFAULT_PREFIX = "streamflow"
#: The consumer group that applies completion events.
COMPLETION_GROUP = "completion-consumers"
#: The consumer group that workers read ready streams with.
WORKERS_GROUP = "workers"
#: More partitions than this only multiply every reader's round trips.
MAX_PARTITIONS = 1024

_FORBIDDEN = re.compile(r"[\s{}]")
_PARTITION_SUFFIX = re.compile(r":\d+$")
_TAG = re.compile(r"^\{([^{}]+)\}")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if _FORBIDDEN.search(value):
        raise ValueError(f"{what} may not contain whitespace or braces, got {value!r}")
    return value


def check_partitions(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"stream partitions must be a whole number, got {value!r}")
    if not 1 <= value <= MAX_PARTITIONS:
        raise ValueError(f"stream partitions must be between 1 and {MAX_PARTITIONS}, got {value}")
    return value


def parse_partitions(text: str | None) -> int:
    """`STREAMFLOW_STREAM_PARTITIONS` as a count: blank or unset is 1."""
    if text is None or not text.strip():
        return 1
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"stream partitions must be a whole number, got {text!r}") from None
    return check_partitions(value)


def partition_for(workflow_id: str, partitions: int) -> int:
    """The partition of every message about `workflow_id`: the one place this is decided."""
    if partitions == 1:
        return 0
    return zlib.crc32(workflow_id.encode("utf-8")) % partitions


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The names of every stream and group one Streamflow deployment uses."""

    prefix: str = DEFAULT_PREFIX
    completion_group: str = COMPLETION_GROUP
    workers_group: str = WORKERS_GROUP
    #: How many partitions the streams are split into (1: the unpartitioned names).
    partitions: int = 1

    def __post_init__(self) -> None:
        _check_name("stream key prefix", self.prefix)
        if _PARTITION_SUFFIX.search(self.prefix):
            raise ValueError(
                f"stream key prefix may not end in ':<digits>' (it would read as a "
                f"partition), got {self.prefix!r}"
            )
        _check_name("completion group name", self.completion_group)
        _check_name("workers group name", self.workers_group)
        check_partitions(self.partitions)

    # -- partitions ------------------------------------------------------------------------

    @property
    def partition_ids(self) -> range:
        return range(self.partitions)

    def partition_of(self, workflow_id: str) -> int:
        return partition_for(workflow_id, self.partitions)

    def tag(self, partition: int) -> str:
        """The Cluster hash tag of `partition`: every key of it shares one slot."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range 0..{self.partitions - 1}")
        if self.partitions == 1:
            return "{" + self.prefix + "}"
        return "{" + f"{self.prefix}:{partition}" + "}"

    def completion_stream(self, partition: int) -> str:
        return f"{self.tag(partition)}:completions"

    def ready_stream(self, queue: str, partition: int) -> str:
        """The ready stream of `queue` in `partition`.

        Any non-empty queue name the builder accepts works: only the first `{...}` of a
        key is its hash tag, so braces or spaces after the prefix change nothing, and
        refusing them here would strand steps the ledger already holds.
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue name must be a non-empty string, got {queue!r}")
        return f"{self.tag(partition)}:ready:{queue}"

    def epoch_key(self, partition: int) -> str:
        """A marker the reconciler sets once per partition; gone means its shard lost data."""
        return f"{self.tag(partition)}:epoch"

    def dead_letter_stream(self, partition: int) -> str:
        return f"{self.tag(partition)}:dead"

    # -- routing by workflow ---------------------------------------------------------------

    def completions_for(self, workflow_id: str) -> str:
        return self.completion_stream(self.partition_of(workflow_id))

    def ready_for(self, queue: str, workflow_id: str) -> str:
        return self.ready_stream(queue, self.partition_of(workflow_id))

    def dead_letter_for(self, stream: str) -> str:
        """The dead-letter stream beside `stream`: same tag, so one MULTI can move an entry."""
        match = _TAG.match(stream)
        if match is None:
            raise ValueError(f"not a stream of this deployment: {stream!r}")
        return f"{{{match.group(1)}}}:dead"

    # -- what readers read -----------------------------------------------------------------

    def all_completions(self) -> list[str]:
        return [self.completion_stream(p) for p in self.partition_ids]

    def ready_streams(self, queues: list[str]) -> list[str]:
        """Ready streams of several queues in every partition, deduplicated, queue-major."""
        return list(
            dict.fromkeys(self.ready_stream(q, p) for q in queues for p in self.partition_ids)
        )

    # -- the unpartitioned names (one partition only) --------------------------------------

    def _single(self, what: str) -> int:
        if self.partitions != 1:
            raise ValueError(
                f"{what} names one stream only with one partition; with {self.partitions} "
                f"use the per-partition names (e.g. completions_for(workflow_id))"
            )
        return 0

    @property
    def hash_tag(self) -> str:
        """The Cluster hash tag of an unpartitioned deployment: all keys share one slot."""
        return self.tag(self._single("hash_tag"))

    @property
    def completions(self) -> str:
        return self.completion_stream(self._single("completions"))

    @property
    def epoch(self) -> str:
        return self.epoch_key(self._single("epoch"))

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream(self._single("dead_letter"))

    def ready(self, queue: str) -> str:
        """The ready stream of `queue` (one partition only; else `ready_for`)."""
        return self.ready_stream(queue, self._single("ready"))

    # -- finding keys ----------------------------------------------------------------------

    @property
    def pattern(self) -> str:
        """A SCAN MATCH pattern for the unpartitioned keys of this prefix (tests, operators).

        Glob specials in the tag are escaped so a prefix like `a*` matches only itself.
        """
        return _escape("{" + self.prefix + "}") + ":*"

    @property
    def patterns(self) -> list[str]:
        """SCAN MATCH patterns for every key of this prefix, in any partition layout."""
        return [self.pattern, _escape("{" + self.prefix + ":") + "[0-9]*}:*"]


def _escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
