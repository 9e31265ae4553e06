"""The servers a run measures against: a disposable Redis of its own, scratch PostgreSQL
databases on the given server, and the counters (commits, commands) read around a run.

Redis is started fresh per suite run so its command counts and CPU belong to the suite
alone; PostgreSQL is shared (one server, a scratch database per system), so commits are
read per database and CPU from the backends serving that database.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    url: str  # without a db number
    pid: int | None  # None: an external server we did not start (CPU not attributed)

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(f"{self.url}/{db}")

    def commands_processed(self) -> int:
        info = self.client().info("stats")
        return int(info["total_commands_processed"])


def _without_db(url: str) -> str:
    head, _, tail = url.rstrip("/").rpartition("/")
    return head if tail.isdigit() and head.count("/") >= 2 else url.rstrip("/")


@contextlib.contextmanager
def disposable_redis(external_url: str | None) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port (no persistence, as the shared one), or the
    external URL the user gave."""
    if external_url:
        yield RedisServer(_without_db(external_url), None)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (or pass --redis-url)")
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--databases",
            "16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(f"redis://127.0.0.1:{port}", proc.pid)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if server.client().ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the benchmark's redis-server did not start") from None
                time.sleep(0.02)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


class Postgres:
    """The PostgreSQL server the suite uses; an admin connection in autocommit."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.base = parsed.set(drivername="postgresql")
        self._admin = psycopg.connect(self.dsn(parsed.database or "postgres"), autocommit=True)

    def dsn(self, database: str) -> str:
        return self.base.set(database=database).render_as_string(hide_password=False)

    def sqlalchemy_url(self, database: str) -> str:
        return self.base.set(drivername="postgresql+psycopg", database=database).render_as_string(
            hide_password=False
        )

    def create_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self._admin.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def commits(self, database: str) -> int:
        row = self._admin.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
        return int(row[0]) if row else 0

    def backend_pids(self, database: str) -> list[int]:
        rows = self._admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def settle_commits(self, database: str, timeout: float = 15.0) -> int:
        """xact_commit once every backend of `database` has exited (a backend flushes its
        counters on exit; a live idle one may hold them back for up to 10 s)."""
        deadline = time.monotonic() + timeout
        while self.backend_pids(database) and time.monotonic() < deadline:
            time.sleep(0.05)
        # one more look: the stats of the last exiting backend land just after it leaves
        last = -1
        while time.monotonic() < deadline:
            now = self.commits(database)
            if now == last:
                return now
            last = now
            time.sleep(0.1)
        return last

    def close(self) -> None:
        self._admin.close()
