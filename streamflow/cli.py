"""`streamflow`: the command line.

Configuration is read here, once (`Settings()`), and passed down as explicit arguments.
Every user mistake ends in one red line on stderr and a non-zero exit code, never a
traceback: 1 for a problem with the database or the ids given, 2 for a malformed URL or
bad usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ledger.db import make_engine
from ledger.errors import LedgerError, SchemaNotReadyError
from ledger.migrate import current_revision, ensure_current, head_revision, upgrade
from streamflow import demo as demo_module
from streamflow import render
from streamflow.builder import Workflow
from streamflow.config import DATABASE_URL_ENV, DatabaseChoice, Settings, resolve_database_url
from streamflow.explain import Explain

app = typer.Typer(
    name="streamflow",
    help="Durable DAG workflows on a PostgreSQL ledger.\n\n"
    "Without --database-url or STREAMFLOW_DATABASE_URL every command uses the embedded "
    "SQLite file ./streamflow.db.\n\n"
    "**Example:** `streamflow demo`, then `streamflow status WORKFLOW_ID` on one of its "
    "workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

#: Exit codes.
EXIT_ERROR = 1
EXIT_USAGE = 2

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL of the ledger, e.g. postgresql://user@localhost/app. "
        f"Defaults to ${DATABASE_URL_ENV}, else the embedded sqlite:///./streamflow.db.",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
]


class CliError(Exception):
    """A user-facing failure: one line, and the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _stdout() -> Console:
    return Console(highlight=False)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    # One line, whatever the message holds; soft_wrap: never break it, however narrow the
    # terminal.
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    _stderr().print(f"[bold red]error:[/bold red] [red]{escape(line)}[/red]", soft_wrap=True)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    """The driver's own words, without SQLAlchemy's background links and SQL echo."""
    source = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = [line.strip() for line in str(source).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(source).__name__


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable url>"


@contextmanager
def _edge(choice: DatabaseChoice | None = None) -> Iterator[None]:
    """Turn every expected failure into one red line and an exit code."""
    where = f" ({_safe(choice.url)})" if choice is not None else ""
    try:
        yield
    except CliError as exc:
        _fail(str(exc), exc.code)
    except LedgerError as exc:
        _fail(str(exc), EXIT_ERROR)
    except ArgumentError as exc:
        _fail(f"not a usable database URL{where}: {_first_line(exc)}", EXIT_USAGE)
    except ImportError as exc:
        _fail(f"the database driver is not installed{where}: {exc}", EXIT_USAGE)
    except OperationalError as exc:
        _fail(f"cannot use the database{where}: {_first_line(exc)}", EXIT_ERROR)
    except DBAPIError as exc:
        _fail(f"database error{where}: {_first_line(exc)}", EXIT_ERROR)


def _choose(database_url: str | None) -> DatabaseChoice:
    choice = resolve_database_url(database_url, Settings())
    if choice.embedded:
        _stderr().print(
            f"Using the embedded default database {choice.url} (a SQLite file in the "
            "current directory). To use PostgreSQL, pass --database-url "
            f"postgresql://USER@HOST/DB or set {DATABASE_URL_ENV}.",
            soft_wrap=True,
        )
    return choice


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _open(choice: DatabaseChoice, *, migrate_embedded: bool = False) -> Engine:
    """An engine on a ledger at the latest schema.

    The embedded default is migrated on the spot when `migrate_embedded`; any other
    database must have been migrated with `streamflow migrate`. A SQLite file that does not
    exist is not created as a side effect of reading.
    """
    engine = make_engine(choice.url)
    if choice.embedded and migrate_embedded:
        upgrade(engine)
        return engine
    path = _sqlite_file(choice.url)
    if path is not None and not path.exists():
        engine.dispose()
        command = (
            "streamflow migrate` or `streamflow demo"
            if choice.embedded
            else "streamflow migrate --database-url ..."
        )
        raise CliError(f"no database file at {path}; create it with `{command}` first")
    try:
        ensure_current(engine)
    except SchemaNotReadyError as exc:
        engine.dispose()
        if choice.source == "option":
            raise CliError(f"{exc} Pass it the same --database-url.") from None
        raise
    return engine


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# -- commands --------------------------------------------------------------------------------------


@app.command()
def demo(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """Build, insert and complete real example workflows, and explain a waiting step.

    Runs five small workflows against the ledger: a customer sync step by step, a fan-out
    / fan-in, a failure that cascade-cancels while cleanup still runs, duplicate and
    ambiguous completions kept as evidence, and a step waiting on a retry.

    The embedded SQLite database is created and migrated on first use; a database given
    with --database-url must have been migrated with `streamflow migrate`.

    **Example:** `streamflow demo --json`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice, migrate_embedded=True)
        try:
            report = demo_module.run_demo(engine)
        finally:
            engine.dispose()
    explained = report.explained
    if as_json:
        _print_json(
            {
                "database": {"url": _safe(choice.url), "embedded": choice.embedded},
                **report.to_dict(),
            }
        )
        return
    flag = "" if choice.embedded else " --database-url URL"
    console = _stdout()
    console.print(f"[dim]database: {escape(_safe(choice.url))}[/dim]")
    for part in render.demo(report):
        console.print(part)
    console.print()
    console.print("Try it yourself:", style="bold")
    for command in (
        f"streamflow explain {explained.workflow_id} {explained.step}{flag}",
        f"streamflow status {explained.workflow_id}{flag}",
    ):
        console.print(f"  {command}", soft_wrap=True)


@app.command()
def migrate(database_url: DatabaseUrlOption = None) -> None:
    """Create or upgrade the ledger's tables to the latest revision. Safe to run again.

    **Example:** `streamflow migrate --database-url postgresql://app@localhost/app`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = make_engine(choice.url)
        try:
            with engine.connect() as conn:
                before = current_revision(conn)
            upgrade(engine)
            with engine.connect() as conn:
                after = current_revision(conn)
        finally:
            engine.dispose()
    head = head_revision()
    console = _stdout()
    where = escape(_safe(choice.url))
    if before == after:
        console.print(f"{where}: already at revision [bold]{after}[/bold] (head); nothing to do.")
    else:
        console.print(
            f"{where}: migrated from [bold]{before or 'an empty database'}[/bold] "
            f"to [bold green]{after}[/bold green]" + (" (head)." if after == head else ".")
        )


@app.command()
def explain(
    workflow_id: Annotated[
        str, typer.Argument(help="The workflow's id.", metavar="WORKFLOW_ID", show_default=False)
    ],
    step: Annotated[
        str, typer.Argument(help="The step's name.", metavar="STEP", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Why a step is where it is: its label and reason, then the raw state beneath.

    Labels: Runnable, Running, Waiting, Blocked, Needs Review, Done, Cancelled. The blocker
    codes and the dependency table say what the step waits for (see docs/explain.md).

    **Example:** `streamflow explain 01a213c9f22a43d4130de5f1c9ef1b34 sync_billing`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            result = Explain.workflow_step(workflow_id, step, repo=engine)
        finally:
            engine.dispose()
    if as_json:
        _print_json(result.to_dict())
        return
    _stdout().print(render.explanation(result))


@app.command()
def status(
    workflow_id: Annotated[
        str, typer.Argument(help="The workflow's id.", metavar="WORKFLOW_ID", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A workflow's state, outcome and counters, and its DAG with every step's label.

    Each step is drawn under each of its parents; a step with several parents is marked
    with all of them.

    **Example:** `streamflow status 01a213c9f22a43d4130de5f1c9ef1b34 --json`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            record = Workflow.get(engine, workflow_id)
            with_results = set(Workflow.results(engine, workflow_id))
        finally:
            engine.dispose()
    views = render.step_views(record, with_results)
    if as_json:
        _print_json(render.status_dict(record, views))
        return
    _stdout().print(render.workflow_status(record, views))


def main() -> None:
    """The console script's entry point."""
    app(prog_name="streamflow")
