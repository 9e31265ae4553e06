"""Running the Alembic migrations programmatically (`streamflow migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from ledger.errors import LedgerError, SchemaNotReadyError

#: Our own version table, so an application's Alembic history is left alone.
VERSION_TABLE = "streamflow_alembic_version"

#: The label of the opt-in branch that partitions the step and evidence tables
#: (PostgreSQL only). The main history never includes it: `upgrade` and `ensure_current`
#: look at the main branch alone, whether the partitioning branch is applied or not.
PARTITION_BRANCH = "partitioned"


def script_location() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise RuntimeError("Streamflow's migrations are missing from this installation")


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["connection"] = connection
    return cfg


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _partition_revisions(scripts: ScriptDirectory) -> set[str]:
    return {
        rev.revision for rev in scripts.walk_revisions() if PARTITION_BRANCH in rev.branch_labels
    }


def head_revision() -> str:
    """The head of the main history (the partitioning branch has a head of its own)."""
    scripts = _scripts()
    heads = set(scripts.get_heads()) - _partition_revisions(scripts)
    assert len(heads) == 1, f"the main migration history must have one head, has {heads}"
    return heads.pop()


def _current_heads(conn: Connection) -> tuple[str, ...]:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_heads()


def _applied(conn: Connection) -> tuple[list[str], set[str]]:
    """The main history's revisions (newest first) and every revision applied.

    Alembic keeps only the heads in the version table, and a partitioned ledger's head
    (p0001) depends on a main revision, which then is not listed itself: what is applied
    is every ancestor of the listed heads, dependencies included.
    """
    scripts = _scripts()
    main = [rev.revision for rev in scripts.iterate_revisions(head_revision(), "base")]
    applied: set[str] = set()
    for head in _current_heads(conn):
        applied.update(rev.revision for rev in scripts.iterate_revisions(head, "base"))
    return main, applied


def current_revision(conn: Connection) -> str | None:
    """Where the main history stands (None: no Streamflow tables yet), whether the
    partitioning branch is applied or not."""
    main, applied = _applied(conn)
    return next((rev for rev in main if rev in applied), None)


def partition_revision(conn: Connection) -> str | None:
    """Where the partitioning branch stands (None: the ledger is not partitioned)."""
    partition = _partition_revisions(_scripts())
    applied = [rev for rev in _current_heads(conn) if rev in partition]
    return applied[0] if applied else None


def upgrade(engine: Engine, revision: str | None = None) -> None:
    """Upgrade the main history to `revision` (default: its head). The partitioning
    branch is never applied by this; see `partition_ledger`."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision or head_revision())


def partition_ledger(engine: Engine, partitions: int) -> None:
    """Apply the opt-in branch that partitions the step and evidence tables by hash of
    workflow id (migrations/versions/p0001_partition_ledger.py). PostgreSQL only."""
    if engine.dialect.name != "postgresql":
        raise LedgerError(
            "partitioning the ledger needs PostgreSQL: SQLite has no table partitions"
        )
    with engine.begin() as conn:
        cfg = alembic_config(conn)
        cfg.attributes["partitions"] = partitions
        command.upgrade(cfg, f"{PARTITION_BRANCH}@head")


def unpartition_ledger(engine: Engine) -> None:
    """Undo `partition_ledger`: plain tables again, every row kept."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), f"{PARTITION_BRANCH}@base")


def partition_count(conn: Connection, table: str = "streamflow_steps") -> int:
    """How many partitions `table` has (0: it is not partitioned)."""
    if conn.dialect.name != "postgresql":
        return 0
    return int(
        conn.execute(
            text(
                "SELECT count(*) FROM pg_inherits "
                "WHERE inhparent = to_regclass(:t) AND to_regclass(:t) IS NOT NULL"
            ),
            {"t": table},
        ).scalar_one()
    )


def ensure_current(engine: Engine) -> None:
    """Raise SchemaNotReadyError unless the database is at the latest migration."""
    with engine.connect() as conn:
        current = current_revision(conn)
    head = head_revision()
    if current != head:
        state = "has no Streamflow tables" if current is None else f"is at revision {current}"
        raise SchemaNotReadyError(
            f"the database {state}; this version needs {head}. Run `streamflow migrate`."
        )
