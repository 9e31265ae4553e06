"""A pooled PostgreSQL connection is checked before it is handed out, without a round
trip: one the server closed is replaced, and a healthy one costs no extra commit (as
SQLAlchemy's pre-ping, an autocommit SELECT 1, would: one per transaction)."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from ledger.db import make_engine

pytestmark = pytest.mark.postgres


def _dsn(postgres_url: str) -> str:
    return make_url(postgres_url).set(drivername="postgresql").render_as_string(False)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def test_a_connection_the_server_closed_is_replaced_at_checkout(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(_dsn(postgres_url), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
            _wait_for(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first,)
                    ).fetchone()
                    == (0,)
                ),
                "the backend to exit",
            )
        with engine.connect() as conn:  # no error: the dead connection was dropped
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second != first
    finally:
        engine.dispose()


def test_a_healthy_checkout_costs_no_commit(postgres_url: str) -> None:
    database = make_url(postgres_url).database

    def commits(admin: psycopg.Connection) -> int:
        admin.execute("SELECT pg_stat_clear_snapshot()")
        row = admin.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
        assert row is not None
        return int(row[0])

    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    with psycopg.connect(_dsn(postgres_url), autocommit=True) as admin:
        with engine.connect():
            pass  # the pool's connection, made before counting
        before = commits(admin)
        for _ in range(20):
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
        engine.dispose()  # the backend exits and flushes its counters
        _wait_for(lambda: commits(admin) - before >= 20, "the backend's counters")
        assert commits(admin) - before < 30  # 20 transactions, not 20 more pings
