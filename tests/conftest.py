"""Shared fixtures: a migrated ledger on SQLite and on a real PostgreSQL.

PostgreSQL comes from STREAMFLOW_TEST_POSTGRES_URL (default: the local server's `test`
database). Each session creates its own throwaway database there and drops it at the
end. Without a reachable server the PostgreSQL tests skip — except under CI=true, where
they fail: a green CI must mean the real backend was exercised.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from ledger import tables as t
from ledger.db import make_engine
from ledger.migrate import partition_ledger, upgrade

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _scrub_streamflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Library code must take explicit arguments; no test may see the developer's settings."""
    for key in list(os.environ):
        if key.startswith("STREAMFLOW_") and not key.startswith("STREAMFLOW_TEST_"):
            monkeypatch.delenv(key)


def _admin_url() -> str:
    return os.environ.get("STREAMFLOW_TEST_POSTGRES_URL", DEFAULT_PG)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    admin_url = make_url(_admin_url()).set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        admin.dispose()
        message = f"PostgreSQL not reachable at {admin_url.render_as_string()}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"streamflow_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    # STREAMFLOW_TEST_PARTITIONS=N runs the PostgreSQL tests on a partitioned ledger
    # (tests/integration/test_partitioning.py does so for a selection of the ledger suite).
    partitions = os.environ.get("STREAMFLOW_TEST_PARTITIONS")
    if partitions:
        partition_ledger(engine, int(partitions))
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "ledger.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


def _truncate(engine: Engine) -> None:
    names = ", ".join(tbl.name for tbl in reversed(t.metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url, pool_size=10, max_overflow=10)
    _truncate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    path = tmp_path / "ledger.db"
    shutil.copy(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The ledger suite runs against both backends."""
    if request.param == "postgres":
        request.applymarker(pytest.mark.postgres)
        return request.getfixturevalue("pg_engine")  # type: ignore[no-any-return]
    return request.getfixturevalue("sqlite_engine")  # type: ignore[no-any-return]
