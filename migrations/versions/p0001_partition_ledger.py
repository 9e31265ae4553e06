"""partition the step and evidence tables by hash of workflow id (opt-in, PostgreSQL)

An Alembic branch of its own, labelled `partitioned`: `streamflow migrate` never applies
it; `streamflow migrate --partition-ledger [--partitions 16]` does. It needs the main
history up to 0006 (`depends_on`), and downgrading the main history past 0006 first
undoes it.

Each table is rebuilt, in this one transaction: its indexes, its primary key and the
foreign keys that point at it are noted (from the catalog, so indexes added by later
revisions of the main history are kept too) and dropped; the table is renamed away; a
table of the same shape is created PARTITION BY HASH (workflow_id) with N partitions
`<table>_p00` ...; the rows are copied; the primary key, indexes and foreign keys are
created again under their own names; the old table goes. Primary keys must include the
partition key: the steps' already does (workflow_id, name); the evidence's becomes
(workflow_id, id) — `id` stays unique, it still comes from its own sequence.

The rebuild holds ACCESS EXCLUSIVE locks on both tables until it commits: run it in a
maintenance window, with the engine's processes stopped.

Revision ID: p0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision: str = "p0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("partitioned",)
depends_on: str | Sequence[str] | None = "0006"

DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 256

#: The tables partitioned, with their primary key before and after.
TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("streamflow_steps", ("workflow_id", "name"), ("workflow_id", "name")),
    ("streamflow_evidence", ("id",), ("workflow_id", "id")),
)


def _partitions() -> int:
    n = context.config.attributes.get("partitions", DEFAULT_PARTITIONS)
    if not isinstance(n, int) or not 2 <= n <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be a whole number from 2 to {MAX_PARTITIONS}, got {n!r}")
    return n


def _rows(sql: str, **params: object) -> list[Any]:
    return list(op.get_bind().execute(sa.text(sql), params).all())


def _indexes(table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of every index on `table` but its primary key."""
    rows = _rows(
        """SELECT i.relname, pg_get_indexdef(x.indexrelid)
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
           WHERE x.indrelid = CAST(:t AS regclass) AND NOT x.indisprimary
           ORDER BY i.relname""",
        t=table,
    )
    # A partitioned table's indexes read "ON ONLY <table>"; rebuilt, they cover it all.
    return [(r[0], r[1].replace(" ON ONLY ", " ON ")) for r in rows]


def _foreign_keys(table: str) -> list[tuple[str, str, str]]:
    """(owning table, name, definition) of every foreign key from or to `table`."""
    return [
        (r[0], r[1], r[2])
        for r in _rows(
            """SELECT CAST(c.conrelid AS regclass)::text, c.conname, pg_get_constraintdef(c.oid)
               FROM pg_constraint c
               WHERE c.contype = 'f' AND c.conparentid = 0
                 AND (c.conrelid = CAST(:t AS regclass) OR c.confrelid = CAST(:t AS regclass))
               ORDER BY c.conname""",
            t=table,
        )
    ]


def _sequences(table: str) -> list[tuple[str, str]]:
    """(sequence, column) for each sequence owned by a column of `table`."""
    return [
        (r[0], r[1])
        for r in _rows(
            """SELECT CAST(s.oid AS regclass)::text, a.attname
               FROM pg_depend d
               JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
               WHERE d.refobjid = CAST(:t AS regclass) AND d.deptype = 'a'""",
            t=table,
        )
    ]


def _rebuild(table: str, new_pk: tuple[str, ...], partitions: int | None) -> None:
    """Rebuild `table` as it is, partitioned by hash of workflow_id into `partitions`
    (or, with None, as a plain table), with `new_pk` as its primary key."""
    indexes = _indexes(table)
    fks = _foreign_keys(table)
    sequences = _sequences(table)
    old = f"{table}_unpartitioned" if partitions else f"{table}_partitioned"
    for owner, name, _ in fks:
        op.execute(f'ALTER TABLE {owner} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        op.execute(f'DROP INDEX "{name}"')
    op.execute(f'ALTER TABLE {table} DROP CONSTRAINT "pk_{table}"')
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")

    spec = " PARTITION BY HASH (workflow_id)" if partitions else ""
    op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){spec}")
    for i in range(partitions or 0):
        op.execute(
            f"CREATE TABLE {table}_p{i:02d} PARTITION OF {table} "
            f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})"
        )
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    for sequence, column in sequences:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {table}.{column}")
    op.execute(f"DROP TABLE {old}")

    op.execute(f'ALTER TABLE {table} ADD CONSTRAINT "pk_{table}" PRIMARY KEY ({", ".join(new_pk)})')
    for _, statement in indexes:
        op.execute(statement)
    for owner, name, definition in fks:
        op.execute(f'ALTER TABLE {owner} ADD CONSTRAINT "{name}" {definition}')
    op.execute(f"ANALYZE {table}")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        raise RuntimeError("partitioning the ledger needs PostgreSQL; SQLite has no partitions")
    n = _partitions()
    for table, _, partitioned_pk in TABLES:
        _rebuild(table, partitioned_pk, n)


def downgrade() -> None:
    for table, plain_pk, _ in TABLES:
        _rebuild(table, plain_pk, None)
