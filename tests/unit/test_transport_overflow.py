"""A read over several streams never returns more than asked; the excess comes next.

XREADGROUP's COUNT is per stream, so a worker reading four partitions with two free
slots could be handed eight entries. The transport keeps the excess (already pending on
that consumer) and hands it out first on the next read.
"""

from __future__ import annotations

import fakeredis

from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import RedisTransport


def test_excess_entries_are_held_for_the_next_read_of_that_consumer() -> None:
    transport = RedisTransport(fakeredis.FakeRedis(decode_responses=True))
    keys = StreamKeys("overflow", partitions=4)
    streams = keys.ready_streams(["default"])
    for stream in streams:
        transport.ensure_group(stream, "g")
        for i in range(2):
            transport.add(stream, {"n": str(i)})

    first = transport.read_group("g", "w1", streams, count=3, block_ms=0)
    assert len(first) == 3
    # Another consumer reading now sees only what nobody was handed yet.
    other = transport.read_group("g", "w2", streams, count=10, block_ms=0)
    second = transport.read_group("g", "w1", streams, count=10, block_ms=0)
    third = transport.read_group("g", "w1", streams, count=10, block_ms=0)
    seen = [(e.stream, e.id) for e in first + second + other + third]
    assert len(seen) == len(set(seen)) == 8  # each entry handed out once, none lost
    assert len(second) + len(first) == 8 and other == [] and third == []
