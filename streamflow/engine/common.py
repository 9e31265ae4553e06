"""Small pieces every engine component shares."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine

from ledger.db import notify_dispatcher, transaction
from ledger.model import ReadyStep
from ledger.transitions import unmark_dispatched
from streamflow.engine.retrying import retrying
from streamflow.logs import log_event
from streamflow.streams.codec import ReadyMessage
from streamflow.streams.publisher import Publisher

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


def publish_or_hand_back(engine: Engine, publisher: Publisher, ready: Sequence[ReadyStep]) -> bool:
    """Publish steps a committed transaction marked dispatched. If the publish fails,
    unmark them and wake the dispatcher, which publishes them on its next pass; False
    then. Never raises for Redis or PostgreSQL being away: the steps' rows are committed,
    and a mark left behind is repaired by the reconciler's stale-dispatch sweep."""
    if not ready or publisher.publish_ready(ready_messages(ready)):
        return True

    def hand_back(conn: Connection) -> None:
        unmark_dispatched(conn, ready)
        notify_dispatcher(conn)

    try:
        in_transaction(engine, hand_back)
    except Exception as exc:
        log_event(
            "stream.hand_back_failed",
            logging.WARNING,
            workflow_id=ready[0].workflow_id,
            steps=len(ready),
            error=str(exc)[:200],
            repaired_by="the reconciler's stale-dispatch sweep",
        )
    return False


def ready_messages(steps: Sequence[ReadyStep]) -> list[ReadyMessage]:
    at = now_ms()
    return [ReadyMessage(s.workflow_id, s.step, s.queue, at, s.priority, s.job) for s in steps]
