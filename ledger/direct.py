"""PostgreSQL: the hot path's statements handed straight to psycopg.

SQLAlchemy's execution path costs about as much interpreter time again as psycopg's own
for each statement — the compiled-cache lookup (hashing the statement's whole cache key),
building the parameters, the result's metadata: 118 µs against 65 µs for the outcome's
read, measured on this project's machine. A worker runs three or four such statements per
step, and the interpreter is what a step mostly costs.

So the few statements every step runs are compiled once per dialect, their bind and result
processors kept, and then only the parameters travel: the same SQL text, the same types in
and out (a test runs each of them both ways and compares), the same errors (psycopg's
are raised as SQLAlchemy's, and a lost connection is invalidated as SQLAlchemy would).

Anything else takes SQLAlchemy's own path: another database or driver, a connection outside
a transaction, and a connection with `before_cursor_execute` listeners (a test counting
statements must see every one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable, ReturnsRows

Processor = Callable[[Any], Any]


@dataclass(slots=True)
class _Plan:
    sql: str
    #: Parameters the statement fixes itself (`state = 'pending'`), already processed.
    constants: dict[str, Any]
    #: Bind processors of the caller's parameters, by name.
    binds: dict[str, Processor]
    #: The result columns that need a processor, by position.
    results: list[tuple[int, Processor]]
    width: int
    #: The result's column names, read from the first execution's description (psycopg
    #: builds the description anew on every access: a few percent of a worker's time).
    names: tuple[str, ...] | None = None


#: By statement object (kept alive here, so no other statement can take its identity)
#: and dialect name.
_plans: dict[tuple[ReturnsRows, str], _Plan] = {}
_plans_lock = threading.Lock()


def rows(conn: Connection, statement: ReturnsRows, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Execute `statement` (one that returns rows) with `params`; its rows as dicts
    keyed by column name."""
    if not _direct(conn):
        executable = cast(Executable, statement)
        return [dict(row) for row in conn.execute(executable, params).mappings()]
    plan = _plan(statement, conn.dialect)
    values = _values(plan, params)
    cursor = _driver(conn).cursor()
    try:
        cursor.execute(plan.sql, values)
        return _rows(plan, cursor)
    except psycopg.Error as exc:
        raise _as_sqlalchemy(conn, exc, plan.sql, values, cursor) from exc
    finally:
        cursor.close()


def pipelined(
    conn: Connection, statements: Sequence[tuple[ReturnsRows, dict[str, Any]]]
) -> list[list[dict[str, Any]]]:
    """Execute `statements` in order, as `rows` would one by one, but sent together (a
    psycopg pipeline: one round trip); each statement's rows. The server still runs them
    one after the other, each with its own snapshot, so a later one sees what an earlier
    one wrote or locked. If one fails, those after it do not run and the error is raised
    as `rows` raises it."""
    if not _direct(conn):
        return [rows(conn, statement, params) for statement, params in statements]
    driver = _driver(conn)
    sent = []
    cursor: psycopg.Cursor[Any] | None = None
    try:
        with driver.pipeline():
            for statement, params in statements:
                plan = _plan(statement, conn.dialect)
                cursor = driver.cursor()
                sent.append((plan, cursor))
                cursor.execute(plan.sql, _values(plan, params))
        return [_rows(plan, cursor) for plan, cursor in sent]
    except psycopg.Error as exc:
        # Which statement failed the pipeline does not say: all of them are named.
        sql = ";\n".join(plan.sql for plan, _ in sent)
        raise _as_sqlalchemy(conn, exc, sql, {}, cursor) from exc
    finally:
        for _, sent_cursor in sent:
            sent_cursor.close()


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


def _values(plan: _Plan, params: dict[str, Any]) -> dict[str, Any]:
    values = dict(plan.constants)
    for name, value in params.items():
        process = plan.binds.get(name)
        values[name] = value if process is None else process(value)
    return values


def _rows(plan: _Plan, cursor: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    """The executed statement's rows as dicts, through the result processors."""
    if plan.names is None:
        plan.names = _names(plan, cursor)
    names = plan.names
    out = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for position, process in plan.results:
        name = names[position]
        for row in out:
            row[name] = process(row[name])
    return out


def _names(plan: _Plan, cursor: psycopg.Cursor[Any]) -> tuple[str, ...]:
    described = cursor.description or []
    names = tuple(column.name for column in described)
    if len(names) != plan.width or len(set(names)) != len(names):
        raise RuntimeError(f"expected {plan.width} distinct columns, the server sent {names}")
    return names


def first(
    conn: Connection, statement: ReturnsRows, params: dict[str, Any]
) -> dict[str, Any] | None:
    """The first row of `rows(...)`, or None."""
    found = rows(conn, statement, params)
    return found[0] if found else None


def _direct(conn: Connection) -> bool:
    return (
        conn.dialect.driver == "psycopg"
        and conn.in_transaction()
        and not conn.dispatch.before_cursor_execute
    )


def _plan(statement: ReturnsRows, dialect: Dialect) -> _Plan:
    # The hot statements are module constants, built once: one plan each.
    key = (statement, dialect.name)
    plan = _plans.get(key)
    if plan is None:
        with _plans_lock:
            plan = _plans.get(key) or _compile(statement, dialect)
            _plans[key] = plan
    return plan


def _compile(statement: ReturnsRows, dialect: Dialect) -> _Plan:
    compiled = statement.compile(dialect=dialect)
    constants: dict[str, Any] = {}
    binds: dict[str, Processor] = {}
    for bind, name in compiled.bind_names.items():
        if bind.expanding:
            raise TypeError(f"{name}: an expanding parameter cannot be sent directly")
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if bind.required:
            if process is not None:
                binds[name] = process
        else:
            value = bind.effective_value
            constants[name] = value if process is None else process(value)
    columns = list(statement.exported_columns)
    if not columns:
        raise TypeError("only a statement that returns rows can be sent directly")
    results = []
    for position, column in enumerate(columns):
        process = column.type.dialect_impl(dialect).result_processor(dialect, None)
        if process is not None:
            results.append((position, process))
    # `%(name)s` with psycopg's paramstyle, the same text SQLAlchemy would send.
    return _Plan(compiled.string, constants, binds, results, len(columns))


def _as_sqlalchemy(
    conn: Connection,
    exc: psycopg.Error,
    sql: str,
    values: dict[str, Any],
    cursor: psycopg.Cursor[Any] | None,
) -> BaseException:
    """psycopg's error as SQLAlchemy's path would raise it; a lost connection is
    invalidated first, so the pool does not hand it out again."""
    driver_error: Any = exc
    lost = conn.dialect.is_disconnect(
        driver_error, conn.connection.dbapi_connection, cast(Any, cursor)
    )
    if lost:
        conn.invalidate(exc)
    return DBAPIError.instance(
        sql, values, exc, psycopg.Error, connection_invalidated=lost, dialect=conn.dialect
    )
