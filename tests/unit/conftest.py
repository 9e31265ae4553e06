"""Fixtures the engine's in-process tests share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from streamflow.streams import StreamKeys, connect
from streamflow.streams.transport import RedisTransport


@pytest.fixture
def keys() -> StreamKeys:
    """Stream names of this test's own (a fresh prefix), in the shared in-process Redis."""
    return StreamKeys(prefix=f"unit{uuid.uuid4().hex[:12]}")


@pytest.fixture
def transport(keys: StreamKeys) -> Iterator[RedisTransport]:
    """The embedded in-process stream; this test's keys are deleted afterwards."""
    transport = connect(None)
    yield transport
    mine = list(transport.client.scan_iter(match=keys.pattern))
    if mine:
        transport.client.delete(*mine)
