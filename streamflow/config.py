"""Settings read from the environment, once, at the edge (the CLI).

Library functions never read these: they take explicit arguments (`repo`, URLs). The CLI
builds `Settings()` once and passes what it resolved down.

| variable                   | meaning                                           |
|----------------------------|---------------------------------------------------|
| `STREAMFLOW_DATABASE_URL`  | the ledger's database (PostgreSQL in production)  |
| `STREAMFLOW_REDIS_URL`     | Redis for streams (none: an in-process stream)    |
| `STREAMFLOW_STREAM_PREFIX` | prefix of every stream key (default `streamflow`) |
| `STREAMFLOW_STREAM_PARTITIONS` | stream partitions, by workflow id (default 1)  |

Without a database URL Streamflow uses an embedded SQLite file, `./streamflow.db`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic_settings import BaseSettings, SettingsConfigDict

#: The database used when none is configured: a SQLite file in the current directory.
EMBEDDED_DATABASE_URL = "sqlite:///./streamflow.db"

#: The environment variable that names the database.
DATABASE_URL_ENV = "STREAMFLOW_DATABASE_URL"


class Settings(BaseSettings):
    """Streamflow's settings, from `STREAMFLOW_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="STREAMFLOW_", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    #: Prefix of every stream key (inside a Redis Cluster hash tag).
    stream_prefix: str = "streamflow"
    #: How many partitions the streams are split into (docs/scaling-out.md). Kept as
    #: text and parsed where the keys are built, so a bad value is one clear CLI error
    #: there rather than a validation failure wherever settings are read.
    stream_partitions: str | None = None
    #: A chaos fault plan (JSON) for the chaos suite's processes; never set it otherwise.
    chaos: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseChoice:
    """The database URL to use and where it came from."""

    url: str
    #: True when nothing was configured and this is the embedded SQLite default.
    embedded: bool
    #: "option" (--database-url), "environment" (STREAMFLOW_DATABASE_URL) or "default".
    source: str


def resolve_database_url(
    explicit: str | None = None, settings: Settings | None = None
) -> DatabaseChoice:
    """The database to use: `explicit` (a command-line option), else the settings, else the
    embedded default `sqlite:///./streamflow.db`.

    Blank values count as unset, so `STREAMFLOW_DATABASE_URL=` falls back to the default.
    """
    if explicit is not None and explicit.strip():
        return DatabaseChoice(explicit.strip(), embedded=False, source="option")
    configured = settings.database_url if settings is not None else None
    if configured is not None and configured.strip():
        return DatabaseChoice(configured.strip(), embedded=False, source="environment")
    return DatabaseChoice(EMBEDDED_DATABASE_URL, embedded=True, source="default")
