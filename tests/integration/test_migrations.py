"""Migrations: an empty database upgraded to head matches the tables exactly, on both
backends, and the whole history downgrades and upgrades again."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata, produce_migrations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url

from ledger import tables as t
from ledger.db import make_engine
from ledger.errors import SchemaNotReadyError
from ledger.migrate import (
    VERSION_TABLE,
    alembic_config,
    current_revision,
    ensure_current,
    head_revision,
    partition_count,
    partition_revision,
    upgrade,
)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        yield engine
        engine.dispose()
        return
    request.applymarker(pytest.mark.postgres)
    base = make_url(request.getfixturevalue("postgres_url"))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"streamflow_mig_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(base.set(database=name).render_as_string(hide_password=False))
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def diff_against_tables(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        return list(compare_metadata(ctx, t.metadata))


def test_upgrade_from_empty_matches_the_tables(empty_engine: Engine) -> None:
    with pytest.raises(SchemaNotReadyError, match="streamflow migrate"):
        ensure_current(empty_engine)
    upgrade(empty_engine)
    ensure_current(empty_engine)
    assert diff_against_tables(empty_engine) == []
    names = set(inspect(empty_engine).get_table_names())
    assert {tbl.name for tbl in t.metadata.sorted_tables} <= names
    assert VERSION_TABLE in names


def _index_definitions(conn: Connection, schema: str = "public") -> dict[str, str]:
    """Every index but the implicit ones, by name, as the database writes it back."""
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        ).all()
    else:
        rows = conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = :s AND tablename = ANY(:tables)"
            ),
            {"s": schema, "tables": list(t.metadata.tables)},
        ).all()
    return {name: _normalised(sql.replace(f" {schema}.", " ")) for name, sql in rows}


def _normalised(definition: str) -> str:
    # PostgreSQL writes an expression back with the casts and brackets of how it last
    # parsed it: a column type changed since (0004) adds some. Neither changes a meaning.
    definition = re.sub(r"::[a-z ]+(\[\])?", "", definition)
    return " ".join(definition.replace("(", "").replace(")", "").split())


def test_upgrade_gives_each_index_the_tables_definition(empty_engine: Engine) -> None:
    """Autogenerate compares an index's columns, not a partial index's WHERE: a migration
    giving one another predicate than the tables declare would pass every other check.
    So the indexes are compared as the database writes them back, against the tables'
    own `create_all` (into a schema of its own, or a second SQLite file)."""
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        migrated = _index_definitions(conn)
    if empty_engine.dialect.name == "sqlite":
        declared_engine = create_engine("sqlite://")
        t.metadata.create_all(declared_engine)
        with declared_engine.connect() as conn:
            declared = _index_definitions(conn)
        declared_engine.dispose()
    else:
        with empty_engine.begin() as conn:
            conn.execute(text("CREATE SCHEMA declared"))
            t.metadata.create_all(conn.execution_options(schema_translate_map={None: "declared"}))
            declared = _index_definitions(conn, "declared")
    assert "WHERE" in declared["ix_streamflow_steps_finished_at"]
    assert migrated == declared


def test_autogenerate_finds_nothing_to_generate(empty_engine: Engine) -> None:
    # What `alembic check` does, minus its demand that every head be applied: the opt-in
    # partitioning branch has a head of its own that `upgrade` leaves alone.
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        assert produce_migrations(ctx, t.metadata).upgrade_ops.is_empty()


def test_upgrade_leaves_the_partitioning_branch_alone(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert partition_revision(conn) is None
        assert partition_count(conn) == 0


def test_downgrade_to_base_and_up_again(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert not {tbl.name for tbl in t.metadata.sorted_tables} & set(
        inspect(empty_engine).get_table_names()
    )
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        assert current_revision(conn) == head_revision()


def test_upgrade_is_idempotent(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        assert current_revision(conn) == head_revision()
