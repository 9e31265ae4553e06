"""Waking the dispatcher when the ledger has something for it (PostgreSQL LISTEN/NOTIFY).

A new workflow's first steps, and children released outside the engine (the API's
`complete_step`), are published by the dispatcher. Polling alone puts its whole interval
(100 ms) on every such step's latency. The ledger sends `NOTIFY streamflow_dispatch`
inside the writing transaction (`ledger.db.notify_dispatcher`), which PostgreSQL delivers
only on commit; the dispatcher waits on it, with the poll interval as its timeout, so a
lost notification, a restarted server or SQLite (no NOTIFY) costs at most one interval.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from sqlalchemy import Engine

from ledger.db import DISPATCH_CHANNEL
from streamflow.logs import log_event

#: After the listening connection failed, try again no sooner than this.
_RECONNECT_SECONDS = 5.0
#: How often a long wait looks at the stop request.
_STOP_CHECK_SECONDS = 0.5
#: How long a drain waits for one more notification once its round trip has brought in
#: every one already committed, so a drain costs next to nothing when there is none. (A
#: timeout of 0 would mean "none" to older psycopg versions.)
_DRAIN_POLL_SECONDS = 0.0001


class DispatchWakeup:
    """`wait(timeout)`: until notified, the timeout passes, or `stop` is set."""

    def __init__(self, engine: Engine, stop: threading.Event) -> None:
        self.stop = stop
        self._conninfo: dict[str, object] | None = None
        if engine.dialect.name == "postgresql":
            self._conninfo = dict(
                engine.url.translate_connect_args(username="user", database="dbname")
            )
            self._conninfo.update(engine.url.query)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._retry_at = 0.0

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def wait(self, timeout: float) -> bool:
        """True when woken by a notification, False after the timeout (or on stop)."""
        conn = self._connection()
        if conn is None:
            self.stop.wait(timeout)
            return False
        deadline = time.monotonic() + timeout
        try:
            # In slices, so a stop request is seen within one.
            while not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self._notified(conn, min(left, _STOP_CHECK_SECONDS)):
                    return True
        except psycopg.Error as exc:
            self._lost(exc)
        return False

    def drain(self) -> None:
        """Take every notification whose commit came before this call, just before a
        pass: that pass serves those commits, so they must not wake the next wait."""
        conn = self._conn
        if conn is None:
            return
        try:
            # A commit's notification reaches this socket when the listening server
            # process gets round to it, which can lag the commit under load. A round trip
            # makes it send every pending one before its answer, and psycopg takes them in
            # with that answer; without it, a late one would wake an extra pass. A bare
            # protocol Sync, not a query: a `SELECT 1` is a transaction, one more
            # PostgreSQL commit per pass (0.16 per W1 step).
            with conn.pipeline() as pipeline:
                pipeline.sync()
            while self._notified(conn, _DRAIN_POLL_SECONDS):
                pass
        except psycopg.Error as exc:
            self._lost(exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[tuple[object, ...]] | None:
        if self._conn is not None or self._conninfo is None:
            return self._conn
        if time.monotonic() < self._retry_at:
            return None
        try:
            conn = psycopg.connect(autocommit=True, **self._conninfo)  # type: ignore[arg-type]
            conn.execute(f"LISTEN {DISPATCH_CHANNEL}")
        except psycopg.Error as exc:
            self._lost(exc)
            return None
        self._conn = conn
        return conn

    @staticmethod
    def _notified(conn: psycopg.Connection[tuple[object, ...]], timeout: float) -> bool:
        # The generator holds the connection's lock until it is closed: close it before
        # anything else uses the connection. (A timeout of 0 would mean "none" to psycopg.)
        gen = conn.notifies(timeout=timeout)
        try:
            return next(gen, None) is not None
        finally:
            gen.close()

    def _lost(self, exc: BaseException) -> None:
        log_event(
            "maintenance.listen_unavailable",
            logging.WARNING,
            error=str(exc)[:200],
            fallback="polling",
        )
        self.close()
        self._retry_at = time.monotonic() + _RECONNECT_SECONDS
