"""Stream key and consumer-group names.

Every key carries the prefix inside a Redis Cluster hash tag, as its first segment:

    {streamflow}:completions          the completion stream (one consumer group)
    {streamflow}:ready:<queue>        one ready stream per queue (one workers group)
    {streamflow}:dead                 the dead-letter stream (read by operators, not groups)

Why the whole prefix is the tag (rather than `streamflow:{completions}`, one slot per
stream): Cluster refuses multi-key commands across slots, and the engine needs several
keys at once — a worker reads all of its queues' ready streams in one XREADGROUP, and
dead-lettering is an XADD to `dead` plus an XACK on the source stream in one MULTI. With
one tag per deployment those all live in one slot. The partitioning issue shards by
putting the partition inside the tag — `{streamflow:7}:completions`,
`{streamflow:7}:ready:emails` — so each partition is one slot holding every stream that
partition's consumers touch together; `hash_tag` is the one place that changes.

Prefixes and group names may not contain braces (in a prefix they would end or nest the
tag) or whitespace (names show up in logs and `redis-cli` sessions, where it only causes
trouble).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "streamflow"
#: The consumer group that applies completion events.
COMPLETION_GROUP = "completion-consumers"
#: The consumer group that workers read ready streams with.
WORKERS_GROUP = "workers"

_FORBIDDEN = re.compile(r"[\s{}]")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if _FORBIDDEN.search(value):
        raise ValueError(f"{what} may not contain whitespace or braces, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The names of every stream and group one Streamflow deployment uses."""

    prefix: str = DEFAULT_PREFIX
    completion_group: str = COMPLETION_GROUP
    workers_group: str = WORKERS_GROUP

    def __post_init__(self) -> None:
        _check_name("stream key prefix", self.prefix)
        _check_name("completion group name", self.completion_group)
        _check_name("workers group name", self.workers_group)

    @property
    def hash_tag(self) -> str:
        """The Cluster hash tag every key starts with: all keys share one slot."""
        return "{" + self.prefix + "}"

    @property
    def completions(self) -> str:
        return f"{self.hash_tag}:completions"

    @property
    def epoch(self) -> str:
        """A marker the reconciler sets once; finding it gone means Redis lost its data."""
        return f"{self.hash_tag}:epoch"

    @property
    def dead_letter(self) -> str:
        return f"{self.hash_tag}:dead"

    def ready(self, queue: str) -> str:
        """The ready stream of `queue`.

        Any non-empty queue name the builder accepts works: only the first `{...}` of a
        key is its hash tag, so braces or spaces after the prefix change nothing, and
        refusing them here would strand steps the ledger already holds.
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue name must be a non-empty string, got {queue!r}")
        return f"{self.hash_tag}:ready:{queue}"

    def ready_streams(self, queues: list[str]) -> list[str]:
        """Ready streams for several queues, deduplicated, in the order given."""
        return list(dict.fromkeys(self.ready(q) for q in queues))

    @property
    def pattern(self) -> str:
        """A SCAN MATCH pattern for every key of this deployment (tests, operators).

        Glob specials in the tag are escaped so a prefix like `a*` matches only itself.
        """
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.hash_tag) + ":*"
