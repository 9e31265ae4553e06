"""Engines and transactions for the ledger.

Every ledger operation takes a `repo`: a SQLAlchemy Engine (the operation runs in its
own transaction and commits) or a Connection (the operation joins the caller's
transaction and the caller commits — so an application can create a workflow atomically
with its own rows).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from select import select as poll_readable
from typing import Any

import psycopg
from sqlalchemy import (
    Connection,
    Engine,
    String,
    bindparam,
    create_engine,
    event,
    func,
    select,
    true,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.expression import ReturnsRows

from ledger import direct
from ledger import tables as t
from ledger.errors import WorkflowNotFoundError

Repo = Engine | Connection

#: Execution option marking a connection that only reads (see `read`).
READ_ONLY = "streamflow_read_only"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine configured for the ledger.

    PostgreSQL URLs without a driver use psycopg 3. A pooled connection is checked
    before it is handed out unless `pool_pre_ping=False`: not by SQLAlchemy's pre-ping
    (an autocommit `SELECT 1`, a round trip and a PostgreSQL commit before every
    transaction) but by reading what its socket holds, which costs neither and finds a
    connection the server closed (restart, terminated backend, idle timeout). SQLite
    gets WAL, a busy timeout, and `BEGIN IMMEDIATE` transactions, so two writers queue
    for the lock instead of failing when one upgrades a read to a write.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        kwargs.pop("pool_pre_ping", None)  # a file does not drop connections
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    check = kwargs.pop("pool_pre_ping", True)
    psycopg_driver = parsed.get_driver_name() == "psycopg"
    # Another driver keeps SQLAlchemy's own pre-ping.
    engine = create_engine(parsed, pool_pre_ping=check and not psycopg_driver, **kwargs)
    if check and psycopg_driver:
        event.listen(engine, "checkout", _drop_if_closed)
    return engine


def _drop_if_closed(dbapi_conn: Any, _record: ConnectionPoolEntry, _proxy: Any) -> None:
    """Refuse a pooled psycopg connection that has something to read. An idle
    connection in the pool is sent nothing unless the server is saying goodbye (a
    FATAL error, then end of file: a restart, a terminated backend, an idle timeout).
    A zero-timeout poll of its socket finds that with no round trip; SQLAlchemy then
    discards the connection and checks out another. A stray notice costs a reconnect."""
    pgconn = dbapi_conn.pgconn
    if pgconn.status != psycopg.pq.ConnStatus.OK:
        raise DisconnectionError("this pooled connection is no longer usable")
    readable, _, _ = poll_readable([pgconn.socket], [], [], 0)
    if readable:
        raise DisconnectionError("the server spoke to (or closed) this idle pooled connection")


def _configure_sqlite(engine: Engine) -> None:
    # The recipe from SQLAlchemy's pysqlite docs: take transaction control away from the
    # driver so BEGIN (and SAVEPOINT) mean what they say.
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        # Reads take a deferred BEGIN so they never wait for (or block) a writer under WAL.
        readonly = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


@contextmanager
def transaction(repo: Repo) -> Iterator[Connection]:
    """A transaction on `repo`: our own on an Engine, the caller's on a Connection.

    On a Connection the operation's writes sit inside a SAVEPOINT where the backend
    supports one cleanly, so a failure part-way leaves the caller's transaction as it was.
    """
    if isinstance(repo, Engine):
        with repo.begin() as conn:
            yield conn
        return
    if repo.dialect.name == "sqlite" and not _sqlite_savepoints_safe(repo):
        yield repo
        return
    with repo.begin_nested():
        yield repo


def _sqlite_savepoints_safe(conn: Connection) -> bool:
    raw = conn.connection.dbapi_connection
    return isinstance(raw, sqlite3.Connection) and raw.isolation_level is None


@contextmanager
def read(repo: Repo) -> Iterator[Connection]:
    """A connection for reads: a short transaction on an Engine, the caller's Connection as is."""
    if isinstance(repo, Engine):
        with repo.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            yield conn
        return
    yield repo


# The hot path's statements are built once: building a Core construct per call costs
# about as much CPU as executing it (SQLAlchemy memoises a prebuilt statement's cache key).
_w = t.workflows
_READ_WORKFLOW = select(_w).where(_w.c.id == bindparam("b_id"))
_LOCK_WORKFLOW = _READ_WORKFLOW.with_for_update()
# Many at once, in the order of `b_ids`, which the caller sorts as Python does (code
# points: "C", byte order in UTF-8), the order a group commit runs its operations in:
# every multi-workflow lock follows one order, so none waits on another in a cycle.
# Each row is locked by primary key as the ids are unnested, in turn (LATERAL): as
# `id = ANY(ids)` under a sort, the planner scanned the whole table when it was small
# (1,500 rows: 0.56 ms a group, in the group commit's single lane).
_lock_ids = t.unnested(("id", "b_ids", String()))
_locked_workflow = select(_w).where(_w.c.id == _lock_ids.c.id).with_for_update().lateral("lw")
_LOCK_WORKFLOWS = select(_locked_workflow).select_from(_lock_ids.join(_locked_workflow, true()))
_TOUCH_WORKFLOW = update(_w).where(_w.c.id == bindparam("b_id")).values(updated_at=_w.c.updated_at)
_LOCK_EVENT = select(func.pg_advisory_xact_lock(func.hashtext(bindparam("b_key", type_=String))))

#: The PostgreSQL channel that wakes the dispatcher (`streamflow.engine.maintenance`).
DISPATCH_CHANNEL = "streamflow_dispatch"
_NOTIFY = select(func.pg_notify(DISPATCH_CHANNEL, ""))


def notify_dispatcher(conn: Connection) -> None:
    """Wake the dispatcher: steps became available that nobody dispatched. PostgreSQL
    delivers a NOTIFY sent inside a transaction only when it commits, so the dispatcher
    never looks before the rows are there. A no-op on SQLite (the dispatcher polls)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY)


def lock_event(conn: Connection, key: str) -> None:
    """Serialise, until the transaction ends, everyone accounting for the completion event
    `key` (consumers and the reconciler) without locking its workflow, which the workers
    need at the same moment. PostgreSQL: a transaction-level advisory lock on the key's
    hash (a collision only serialises two unrelated events). SQLite: every write
    transaction already holds the database lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_EVENT, {"b_key": key})


#: `Connection.info` key: rows of workflows a group locked up front, not yet handed out.
PRELOCKED = "streamflow_prelocked"
#: `Connection.info` keys: what a group read with its locks, by workflow, not yet handed
#: out (`workflows_locked`'s `reads`); and what `lock_workflow` handed to the operation
#: that locked last, until it takes it (`take_read_ahead`).
READ_AHEAD_BY_WORKFLOW = "streamflow_read_ahead_by_workflow"
READ_AHEAD = "streamflow_read_ahead"

#: A read to make with a group's locks: the key its taker asks for, the statement and
#: its parameters.
ReadAhead = tuple[Hashable, ReturnsRows, dict[str, Any]]


@contextmanager
def workflows_locked(
    conn: Connection, workflow_ids: Sequence[str], reads: Mapping[str, ReadAhead] | None = None
) -> Iterator[None]:
    """Lock every workflow of a group of operations with one statement, for the rest of
    the transaction; inside, a workflow's `lock_workflow` is free while its row is known.

    The group commit runs several operations (claims, outcomes) in one transaction, each
    of which locks its workflow first: one round trip each. Here they are all locked up
    front, in sorted order, and each row is handed to the first operation that asks. An
    outcome written in one statement hands on the row it left (`hand_on_row`), so the
    next operation of the same workflow needs no statement either; anything else that
    changes the row makes the next one read it (`lock_workflow` takes a row only once).
    `workflow_ids` has one entry per operation. PostgreSQL only, and only for two
    operations or more (one lock is one statement either way). A workflow that does not
    exist is simply not locked: its operation's own `lock_workflow` raises as it always
    did.

    `reads`, by workflow: a read of that workflow's first operation, sent with the lock
    in one round trip. The server runs it after the lock, with a snapshot of its own, so
    it sees what the operation itself would read first; the operation takes it with
    `take_read_ahead`. Only the workflow's first operation gets it: later ones must see
    what it wrote. Not for a lone operation: measured at a moderate load (W4 at 120
    workflows/s), a pipeline of its lock and read took longer than sending the two
    (from a step's end to its outcome's timestamp: 0.07 -> 1.1 ms at the median).
    """
    reads = reads or {}
    if conn.dialect.name != "postgresql" or len(workflow_ids) < 2:
        yield
        return
    lock = (_LOCK_WORKFLOWS, {"b_ids": sorted(set(workflow_ids))})
    if reads:
        locked, *read = direct.pipelined(conn, [lock, *((s, p) for _, s, p in reads.values())])
    else:
        locked, read = direct.rows(conn, *lock), []
    conn.info[PRELOCKED] = {row["id"]: row for row in locked}
    conn.info[READ_AHEAD_BY_WORKFLOW] = {
        workflow_id: (key, rows)
        for (workflow_id, (key, _, _)), rows in zip(reads.items(), read, strict=True)
    }
    try:
        yield
    finally:
        # `info` outlives the transaction (it belongs to the pooled DBAPI connection).
        for key in (PRELOCKED, READ_AHEAD_BY_WORKFLOW, READ_AHEAD):
            conn.info.pop(key, None)


def locked_with_reads(
    conn: Connection, workflow_ids: Sequence[str], reads: Sequence[ReadAhead | None]
) -> AbstractContextManager[None]:
    """`workflows_locked` for a group of operations (`workflow_ids` in the order they
    run), with the first statement of each workflow's first operation sent with the
    locks where that operation names one in `reads` (else None): one round trip for the
    group's lock and those statements together. The worker's group scope."""
    ahead: dict[str, ReadAhead] = {}
    seen: set[str] = set()
    for workflow_id, read in zip(workflow_ids, reads, strict=True):
        if workflow_id not in seen and read is not None:
            ahead[workflow_id] = read
        seen.add(workflow_id)
    return workflows_locked(conn, workflow_ids, ahead)


def take_read_ahead(conn: Connection, key: Hashable) -> list[dict[str, Any]] | None:
    """The rows read ahead under `key` for the operation that locked its workflow last
    (see `workflows_locked`), or None: the caller reads for itself. Taken once."""
    held: tuple[Hashable, list[dict[str, Any]]] | None = conn.info.pop(READ_AHEAD, None)
    return held[1] if held is not None and held[0] == key else None


def hand_on_row(conn: Connection, row: Mapping[Any, Any], *, prefix: str = "") -> None:
    """`row` holds the locked workflow's row as the statement just run left it (each
    column under `prefix` + its name): within a group (`workflows_locked`), the next
    `lock_workflow` of it takes it without a read."""
    prelocked: dict[str, dict[str, Any]] | None = conn.info.get(PRELOCKED)
    if prelocked is not None:
        left = {column.name: row[prefix + column.name] for column in _w.c}
        prelocked[left["id"]] = left


def forget_row(conn: Connection, workflow_id: str) -> None:
    """The workflow's row is about to change without `lock_workflow` (a claim made under
    a lock its caller already holds): what was handed on is no longer current."""
    prelocked: dict[str, dict[str, Any]] | None = conn.info.get(PRELOCKED)
    if prelocked is not None:
        prelocked.pop(workflow_id, None)


def lock_workflow(conn: Connection, workflow_id: str) -> dict[str, Any]:
    """Lock the workflow row for the rest of the transaction and return it.

    Every transition of a workflow's steps takes this lock first, so transitions of one
    workflow are serialised: under READ COMMITTED each later statement sees what the
    previous holder committed. That is what makes a fan-in release exactly once when
    two parents finish at the same moment. On SQLite the whole database is locked by
    the first write, so the lock is a no-op update taken before any read.
    """
    ahead: dict[str, Any] | None = conn.info.get(READ_AHEAD_BY_WORKFLOW)
    if ahead is not None:
        # What the group read for this workflow goes to its first operation, this one,
        # and to nobody after it; another workflow's unused read is dropped.
        conn.info[READ_AHEAD] = ahead.pop(workflow_id, None)
    prelocked: dict[str, dict[str, Any]] | None = conn.info.get(PRELOCKED)
    if prelocked:
        # Locked with the rest of its group (`workflows_locked`). Taken once: whoever
        # changes the row next either hands on what it left (`hand_on_row`) or leaves
        # the next operation to read it.
        locked = prelocked.pop(workflow_id, None)
        if locked is not None:
            return locked
    row: Mapping[Any, Any] | None
    params = {"b_id": workflow_id}
    if conn.dialect.name == "sqlite":
        conn.execute(_TOUCH_WORKFLOW, params)
        row = conn.execute(_READ_WORKFLOW, params).mappings().first()
    else:
        row = direct.first(conn, _LOCK_WORKFLOW, params)
    if row is None:
        raise WorkflowNotFoundError(workflow_id)
    return dict(row)
