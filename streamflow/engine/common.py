"""Small pieces every engine component shares."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine

from ledger.db import transaction
from ledger.model import ReadyStep
from streamflow.engine.retrying import retrying
from streamflow.streams.codec import ReadyMessage

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def consumer_name(role: str) -> str:
    """A name unique to this process and role, readable in XINFO CONSUMERS output."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work` in a ledger transaction, retrying if PostgreSQL is briefly away."""

    def once() -> T:
        with transaction(engine) as conn:
            return work(conn)

    return retrying(once)


def ready_messages(steps: Sequence[ReadyStep]) -> list[ReadyMessage]:
    at = now_ms()
    return [ReadyMessage(s.workflow_id, s.step, s.queue, at, s.priority, s.job) for s in steps]
