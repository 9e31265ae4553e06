"""Alembic environment for the Streamflow ledger.

Honours a connection passed in `config.attributes["connection"]` (how `streamflow
migrate` and the tests run it); otherwise builds an engine from `sqlalchemy.url` or
STREAMFLOW_DATABASE_URL.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from ledger.db import make_engine
from ledger.migrate import VERSION_TABLE
from ledger.tables import metadata

config = context.config


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    given = config.attributes.get("connection")
    if given is not None:
        run_with(given)
    else:
        url = config.get_main_option("sqlalchemy.url") or os.environ["STREAMFLOW_DATABASE_URL"]
        engine = make_engine(url)
        with engine.begin() as conn:
            run_with(conn)
        engine.dispose()
