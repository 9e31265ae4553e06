"""`streamflow`: the command line.

Configuration is read here, once (`Settings()`), and passed down as explicit arguments.
Every user mistake ends in one red line on stderr and a non-zero exit code, never a
traceback: 1 for a problem with the database or the ids given, 2 for a malformed URL or
bad usage.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit

import redis.exceptions
import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ledger.db import make_engine, transaction
from ledger.errors import InvalidCompletionError, LedgerError, SchemaNotReadyError
from ledger.migrate import current_revision, ensure_current, head_revision, upgrade
from ledger.rules import CompletionStatus
from ledger.transitions import complete_step, unmark_dispatched
from streamflow import demo as demo_module
from streamflow import logs, render
from streamflow.builder import Workflow
from streamflow.config import DATABASE_URL_ENV, DatabaseChoice, Settings, resolve_database_url
from streamflow.engine.common import now_ms, ready_messages
from streamflow.engine.launch import EngineOptions, build_runner
from streamflow.engine.runner import Runner
from streamflow.explain import Explain
from streamflow.reconciler import Reconciler, ReconcilerConfig
from streamflow.streams.codec import CompletionEvent
from streamflow.streams.keys import StreamKeys, parse_partitions
from streamflow.streams.publisher import Publisher
from streamflow.streams.seam import wrap_for_chaos
from streamflow.streams.transport import StreamTransport
from streamflow.streams.transport import connect as connect_streams

if TYPE_CHECKING:
    from streamflow.metrics import MetricsServer

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
    except (LookupError, InvalidCompletionError) as exc:
        # Bad input: an unknown workflow or step, an outcome the step cannot take.
        _fail(str(exc), EXIT_USAGE)
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


def _open(
    choice: DatabaseChoice, *, migrate_embedded: bool = False, pre_ping: bool = True
) -> Engine:
    """An engine on a ledger at the latest schema.

    The embedded default is migrated on the spot when `migrate_embedded`; any other
    database must have been migrated with `streamflow migrate`. A SQLite file that does not
    exist is not created as a side effect of reading.

    `pre_ping=False` (the engine's processes): no liveness round trip before each
    transaction. Every ledger call they make is retried on a lost connection, and the
    first such error makes SQLAlchemy discard every pooled connection, so a restarted
    PostgreSQL costs one retry instead of a ping per transaction (on psycopg the ping is
    an autocommit statement: a PostgreSQL commit of its own).
    """
    engine = make_engine(choice.url, pool_pre_ping=pre_ping)
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
def demo(
    database_url: DatabaseUrlOption = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis for the demo's streams, e.g. redis://localhost:6379/0. Only with "
            "--database-url or $STREAMFLOW_DATABASE_URL (streams and ledger belong "
            "together); defaults to $STREAMFLOW_REDIS_URL, else an in-process stream.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run real example workflows end to end through an in-process engine, and watch them.

    Inserts five small workflows — a customer sync passing results along, a fan-out /
    fan-in, a failure that cascade-cancels while a `continue` cleanup still runs, a flaky
    step that succeeds on retry, and one whose outcome is then replayed by hand — starts a
    worker, a completion consumer, the dispatcher and the reconciler in this process, and
    shows every step live until all have finished. Then it prints what the ledger recorded
    and explains a cancelled step.

    No servers needed: the embedded SQLite database is created and migrated on first use
    and the streams live in this process. A database given with --database-url must have
    been migrated with `streamflow migrate`.

    **Example:** `streamflow demo --json`
    """
    from rich.console import RenderableType
    from rich.live import Live

    from streamflow.demo import QUEUES, DemoError, Progress

    choice = _choose(database_url)
    console = _stdout()
    last: list[Progress] = []

    def draw(p: Progress) -> RenderableType:
        return render.progress(p, streams=streams, queues=QUEUES)

    with _edge(choice):
        if choice.embedded and redis_url is not None and redis_url.strip():
            raise CliError(
                "--redis-url needs --database-url (or STREAMFLOW_DATABASE_URL): the streams "
                "and the ledger belong together, and the demo on the embedded SQLite "
                "database uses an in-process stream",
                EXIT_USAGE,
            )
        url = None if choice.embedded else _redis_url(redis_url)
        if choice.embedded and _redis_url(None) is not None:
            _stderr().print(
                "Ignoring STREAMFLOW_REDIS_URL: the demo on the embedded SQLite database "
                "uses an in-process stream.",
                soft_wrap=True,
            )
        streams = "an in-process stream (fakeredis)" if url is None else _safe_redis(url)
        engine = _open(choice, migrate_embedded=True)
        try:
            transport = _connect_streams(url)
            if not as_json:
                console.print(f"[dim]database: {escape(_safe(choice.url))}[/dim]")
            try:
                if not as_json and console.is_terminal:
                    with Live(console=console, refresh_per_second=10, transient=True) as live:

                        def show(p: Progress) -> None:
                            last[:] = [p]
                            live.update(draw(p))

                        report = demo_module.run_demo(
                            engine, transport, _keys(), streams=streams, on_progress=show
                        )
                else:
                    report = demo_module.run_demo(
                        engine, transport, _keys(), streams=streams, on_progress=last.append
                    )
            except DemoError as exc:
                if last and not as_json:
                    console.print(draw(last[-1]))
                raise CliError(str(exc)) from None
        finally:
            engine.dispose()
    if as_json:
        _print_json(
            {
                "database": {"url": _safe(choice.url), "embedded": choice.embedded},
                **report.to_dict(),
            }
        )
        return
    console.print(draw(last[-1]))
    for part in render.demo(report):
        console.print(part)
    flag = "" if choice.embedded else " --database-url URL"
    fan = report.workflow("fan_out")
    explained = report.explained
    replayed = report.workflow("evidence")
    console.print()
    console.print("Try next:", style="bold")
    for command, what in (
        (f"streamflow status {fan.workflow_id}{flag}", "the fan-out's DAG, every step labelled"),
        (
            f"streamflow explain {explained.workflow_id} {explained.step}{flag}",
            "why a step was cancelled",
        ),
        (
            f"streamflow explain {replayed.workflow_id} {report.replayed_step}{flag}",
            "a step flagged for review",
        ),
    ):
        console.print(f"  {command}  [dim]# {what}[/dim]", soft_wrap=True)
    console.print(
        "  Your own workers: put Worker subclasses in myapp.py, insert a workflow with "
        "Workflow.insert, then run them with",
        soft_wrap=True,
    )
    console.print(
        f"  PYTHONPATH=. streamflow run --app myapp --queues default{flag}", soft_wrap=True
    )


@app.command()
def migrate(
    database_url: DatabaseUrlOption = None,
    partition_ledger: Annotated[
        bool,
        typer.Option(
            "--partition-ledger",
            help="Also apply the opt-in migration that partitions the step and evidence "
            "tables by hash of workflow id (PostgreSQL only; see docs/deployment.md).",
        ),
    ] = False,
    partitions: Annotated[
        str,
        typer.Option("--partitions", help="With --partition-ledger: how many (2 to 256)."),
    ] = "16",
) -> None:
    """Create or upgrade the ledger's tables to the latest revision. Safe to run again.

    **Example:** `streamflow migrate --database-url postgresql://app@localhost/app`
    (add `--partition-ledger --partitions 16` to partition the big tables)
    """
    from streamflow.commands.partition import (
        apply_partitioning,
        partitions_option,
        require_postgres,
    )

    with _edge():
        count = partitions_option(partitions) if partition_ledger else 0
    choice = _choose(database_url)
    with _edge(choice):
        engine = make_engine(choice.url)
        try:
            if count:
                require_postgres(engine)
            with engine.connect() as conn:
                before = current_revision(conn)
            upgrade(engine)
            with engine.connect() as conn:
                after = current_revision(conn)
            partitioned = apply_partitioning(engine, count) if count else None
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
    if partitioned is not None:
        console.print(f"{where}: {partitioned}")


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


# -- the engine ------------------------------------------------------------------------------------

RedisUrlOption = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis for the streams, e.g. redis://localhost:6379/0, or a Redis Cluster: "
        "redis+cluster://host:7000,host:7001. Defaults to "
        "$STREAMFLOW_REDIS_URL; `run` without one uses an in-process stream.",
        show_default=False,
    ),
]
PartitionsOption = Annotated[
    int | None,
    typer.Option(
        "--partitions",
        min=1,
        max=1024,
        help="Stream partitions (by workflow id); every process of a deployment should use "
        "the same. Defaults to $STREAMFLOW_STREAM_PARTITIONS, else 1. See "
        "docs/scaling-out.md.",
        show_default=False,
    ),
]
AppOption = Annotated[
    list[str] | None,
    typer.Option(
        "--app", help="A module with your Worker classes, imported at start (repeatable)."
    ),
]
QueuesOption = Annotated[
    str, typer.Option("--queues", help="Comma-separated queues to take steps from.")
]
ConcurrencyOption = Annotated[
    int, typer.Option("--concurrency", min=1, max=512, help="Steps performing at once.")
]
InFlightOption = Annotated[
    int | None,
    typer.Option(
        "--in-flight",
        min=1,
        max=2048,
        help="Steps held at once: claimed, performing or being recorded "
        "[default: 4 x --concurrency]. More than --concurrency lets the ledger's commits "
        "overlap running steps; a claimed step may wait here for a free slot.",
        show_default=False,
    ),
]
LeaseOption = Annotated[
    float,
    typer.Option(
        "--lease-seconds",
        min=1.0,
        help="How long a claim holds without renewal "
        "before the step is rescued (renewed every third of it).",
    ),
]
HandOffOption = Annotated[
    bool,
    typer.Option(
        "--hand-off/--no-hand-off",
        help="Run a child the finished step released next, on the same thread, claimed in the "
        "same commit (no ready message). --no-hand-off sends every child through its queue.",
    ),
]
DrainOption = Annotated[
    float,
    typer.Option(
        "--drain-seconds",
        min=0.0,
        help="On SIGTERM, how long in-flight steps may finish before their claims are released.",
    ),
]

RedispatchOption = Annotated[
    float,
    typer.Option(
        "--redispatch-after",
        min=0.5,
        help="Seconds a dispatched step may stay "
        "unclaimed before it is dispatched again (its ready message was lost).",
    ),
]

ReconcileEveryOption = Annotated[
    float,
    typer.Option(
        "--reconcile-every", min=0.5, help="Seconds between reconciler passes in this process."
    ),
]
MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve Prometheus metrics on this port at /metrics (0: any free port; needs "
        "the `metrics` extra: pip install 'streamflow[metrics]').",
        show_default=False,
    ),
]
MetricsHostOption = Annotated[
    str,
    typer.Option("--metrics-host", help="The address --metrics-port binds to."),
]


def _redis_url(explicit: str | None) -> str | None:
    for value in (explicit, Settings().redis_url):
        if value is not None and value.strip():
            return value.strip()
    return None


def _connect_streams(url: str | None) -> StreamTransport:
    """A transport that answered a PING, or a one-line error."""
    where = "the in-process stream" if url is None else _safe_redis(url)
    try:
        transport = wrap_for_chaos(connect_streams(url), Settings().chaos)
        transport.ping()
    except ValueError as exc:
        raise CliError(f"not a usable Redis URL: {exc}", EXIT_USAGE) from None
    except redis.exceptions.RedisError as exc:
        raise CliError(f"cannot reach Redis at {where}: {exc}") from None
    return transport


def _safe_redis(url: str) -> str:
    parsed = urlsplit(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return parsed._replace(netloc=netloc).geturl()
    return url


def _keys(partitions: int | None = None) -> StreamKeys:
    settings = Settings()
    try:
        count = partitions or parse_partitions(settings.stream_partitions)
    except ValueError as exc:
        raise CliError(f"STREAMFLOW_STREAM_PARTITIONS: {exc}", EXIT_USAGE) from None
    try:
        return StreamKeys(prefix=settings.stream_prefix, partitions=count)
    except ValueError as exc:
        raise CliError(f"STREAMFLOW_STREAM_PREFIX: {exc}", EXIT_USAGE) from None


def _queues(raw: str) -> tuple[str, ...]:
    queues = tuple(dict.fromkeys(q.strip() for q in raw.split(",") if q.strip()))
    if not queues:
        # Checked before any `_edge`, so it reports itself.
        _fail("--queues needs at least one queue name", EXIT_USAGE)
    return queues


def _in_flight(in_flight: int | None, concurrency: int) -> int | None:
    if in_flight is not None and in_flight < concurrency:
        _fail(
            f"--in-flight ({in_flight}) must be at least --concurrency ({concurrency}): "
            "every step performing is also held",
            EXIT_USAGE,
        )
    return in_flight


def _start_engine(
    database_url: str | None,
    redis_url: str | None,
    options: EngineOptions,
    *,
    embedded_streams_allowed: bool,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    partitions: int | None = None,
) -> int:
    choice = _choose(database_url)
    url = _redis_url(redis_url)
    with _edge(choice):
        if url is None and not embedded_streams_allowed:
            raise CliError(
                "this command runs as a separate process, so it needs a real Redis: pass "
                "--redis-url or set STREAMFLOW_REDIS_URL (or use `streamflow run`, which "
                "runs everything in one process with an in-process stream)",
                EXIT_USAGE,
            )
        if url is None:
            _stderr().print(
                "Using an in-process stream (no --redis-url or "
                "STREAMFLOW_REDIS_URL): steps run only inside this process.",
                soft_wrap=True,
            )
        engine = _open(choice, migrate_embedded=True, pre_ping=False)
        transport = _connect_streams(url)
        try:
            runner, _ = build_runner(engine, transport, _keys(partitions), options)
        except ImportError as exc:
            raise CliError(f"cannot import --app module: {exc}", EXIT_USAGE) from None
        metrics = None if metrics_port is None else _serve_metrics(metrics_port, metrics_host)
    logs.configure()
    _settle_heap()
    try:
        return runner.run_until_signalled(options.drain_seconds)
    finally:
        if metrics is not None:
            metrics.close()
        engine.dispose()


def _settle_heap() -> None:
    """Collect once, then freeze what start-up built (modules, the app's workers, the
    engine): it lives as long as the process, and the collector would otherwise walk it
    on every full collection — measured at ~57 ms, a pause of every thread in the middle
    of the first minute's steps."""
    gc.collect()
    gc.freeze()


def _serve_metrics(port: int, host: str) -> MetricsServer:
    """Start the Prometheus exporter, or a one-line error (the `metrics` extra is optional)."""
    try:
        from streamflow import metrics
    except ImportError:
        raise CliError(
            "--metrics-port needs prometheus-client: pip install 'streamflow[metrics]'",
            EXIT_USAGE,
        ) from None
    try:
        server = metrics.serve(port, host)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    _stderr().print(
        f"Serving Prometheus metrics on http://{host}:{server.port}/metrics", soft_wrap=True
    )
    return server


@app.command()
def worker(
    queues: QueuesOption = "default",
    concurrency: ConcurrencyOption = 8,
    in_flight: InFlightOption = None,
    apps: AppOption = None,
    lease_seconds: LeaseOption = 30.0,
    drain_seconds: DrainOption = 30.0,
    hand_off: HandOffOption = True,
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    partitions: PartitionsOption = None,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
) -> None:
    """Run steps: read the queues' ready streams, claim, perform, record the outcome.

    Each step runs at most once per attempt: the claim in the ledger decides. SIGTERM
    drains: no new claims, in-flight steps finish (or are released after
    --drain-seconds), nothing is lost. Logs one JSON line per lifecycle event.

    **Example:** `streamflow worker --app myapp.workers --queues default,emails --concurrency 8`
    """
    options = EngineOptions(
        queues=_queues(queues),
        concurrency=concurrency,
        in_flight=_in_flight(in_flight, concurrency),
        apps=tuple(apps or ()),
        lease_seconds=lease_seconds,
        drain_seconds=drain_seconds,
        hand_off=hand_off,
    )
    raise typer.Exit(
        _start_engine(
            database_url,
            redis_url,
            options,
            embedded_streams_allowed=False,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            partitions=partitions,
        )
    )


@app.command()
def consume(
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    partitions: PartitionsOption = None,
    redispatch_after: RedispatchOption = 30.0,
    reconcile_every: ReconcileEveryOption = 5.0,
    batch: Annotated[
        int,
        typer.Option(
            "--batch", min=1, max=10_000, help="Completion events per ledger transaction."
        ),
    ] = 200,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
) -> None:
    """Consume completion events, dispatch ready steps, and run the reconciler.

    Applies each completion's release if it is missing, dispatches released children to
    their queues' ready streams and moves due retries back to available. The reconciler
    (every --reconcile-every seconds) rescues expired leases, dispatches again steps whose
    ready message was lost, and repairs what dropped events left undone.

    **Example:** `streamflow consume --redis-url redis://localhost:6379/0`
    """
    options = EngineOptions(
        consumer=True,
        maintenance=True,
        batch=batch,
        redispatch_after_seconds=redispatch_after,
        reconcile_every=reconcile_every,
    )
    raise typer.Exit(
        _start_engine(
            database_url,
            redis_url,
            options,
            embedded_streams_allowed=False,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            partitions=partitions,
        )
    )


@app.command()
def run(
    queues: QueuesOption = "default",
    concurrency: ConcurrencyOption = 8,
    in_flight: InFlightOption = None,
    apps: AppOption = None,
    lease_seconds: LeaseOption = 30.0,
    drain_seconds: DrainOption = 30.0,
    hand_off: HandOffOption = True,
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    partitions: PartitionsOption = None,
    redispatch_after: RedispatchOption = 30.0,
    reconcile_every: ReconcileEveryOption = 5.0,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
) -> None:
    """Everything in one process: a worker, a completion consumer, the dispatcher and the
    reconciler.

    The easy way to start. With no database or Redis configured it uses the embedded
    SQLite ledger and an in-process stream, so it needs no servers at all.

    **Example:** `streamflow run --app myapp.workers --queues default`
    """
    options = EngineOptions(
        queues=_queues(queues),
        concurrency=concurrency,
        in_flight=_in_flight(in_flight, concurrency),
        apps=tuple(apps or ()),
        consumer=True,
        maintenance=True,
        lease_seconds=lease_seconds,
        drain_seconds=drain_seconds,
        redispatch_after_seconds=redispatch_after,
        reconcile_every=reconcile_every,
        hand_off=hand_off,
    )
    raise typer.Exit(
        _start_engine(
            database_url,
            redis_url,
            options,
            embedded_streams_allowed=True,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            partitions=partitions,
        )
    )


@app.command()
def complete(
    workflow_id: Annotated[str, typer.Argument(help="The workflow's id.")],
    step: Annotated[str, typer.Argument(help="The step's name.")],
    step_status: Annotated[
        str, typer.Option("--status", help="completed, retryable, failed or cancelled.")
    ] = "completed",
    payload: Annotated[
        str, typer.Option("--payload", help="The outcome's payload as JSON.")
    ] = "null",
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a step's outcome by hand and publish it, as a worker would.

    The ledger is written first (releases and cascades included); the completion event
    and the released steps' ready messages are then published. Without Redis, or if the
    publish fails, the consumer's dispatcher picks the released steps up from the ledger.

    **Example:** `streamflow complete WF_ID fetch_customer --payload '{"id": 1}'`
    """
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        _fail(f"--payload is not valid JSON: {exc}", EXIT_USAGE)
    choice = _choose(database_url)
    url = _redis_url(redis_url)
    with _edge(choice):
        engine = _open(choice)
        # Reach Redis before writing: if it is down, the outcome is still recorded, but the
        # released steps are left for the dispatcher instead of being marked as sent.
        publisher: Publisher | None = None
        unreachable = ""
        if url is not None:
            try:
                publisher = Publisher(_connect_streams(url), _keys())
            except CliError as exc:
                unreachable = str(exc)
        try:
            with transaction(engine) as conn:
                result = complete_step(
                    conn,
                    workflow_id,
                    step,
                    step_status,
                    value,
                    source="cli",
                    dispatch=publisher is not None,
                )
        finally:
            engine.dispose()
        published = False
        if publisher is not None and result.applied:
            published = publisher.publish_ready(ready_messages(result.ready))
            event = CompletionEvent(
                workflow_id, step, CompletionStatus(result.status), result.attempt, now_ms()
            )
            published = publisher.publish_completion(event) and published
            if not published and result.ready:
                with engine.begin() as conn:
                    unmark_dispatched(conn, result.ready)
    summary = {
        "workflow_id": workflow_id,
        "step": step,
        "classification": result.classification.value,
        "status": result.status,
        "attempt": result.attempt,
        "released": list(result.released),
        "cancelled": list(result.cancelled),
        "workflow_outcome": result.workflow_outcome,
        "published": published,
        "publish_error": unreachable or None,
    }
    if as_json:
        _print_json(summary)
        return
    out = _stdout()
    out.print(f"{step}: {result.classification.value} ({result.status}, attempt {result.attempt})")
    if result.released:
        out.print("released: " + ", ".join(result.released))
    if result.cancelled:
        out.print("cancelled: " + ", ".join(result.cancelled))
    if result.workflow_outcome:
        out.print(f"workflow finished: {result.workflow_outcome}")
    if result.applied and not published:
        why = f" ({unreachable})" if unreachable else ""
        out.print(
            f"not published to Redis{why}; the dispatcher picks released steps up from the ledger"
        )


@app.command()
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="Run one pass, print it, exit.")] = False,
    every: Annotated[
        str, typer.Option("--every", help="Loop with this interval, e.g. 5s, 500ms, 1m.")
    ] = "5s",
    redispatch_after: RedispatchOption = 30.0,
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    partitions: PartitionsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Repair what the streams lost, from the ledger: one pass, or a loop.

    Finds releases never applied, completion events never consumed (recorded as
    `dropped`), expired leases, missed retries, ready messages lost, stream entries idle
    on dead consumers, and a Redis that lost its data — repairs each once, with a
    recovery row, and writes a summary row per pass. Safe beside running workers,
    consumers and other reconcilers.

    **Example:** `streamflow reconcile --once` or `streamflow reconcile --every 5s`
    """
    interval = _duration(every)
    choice = _choose(database_url)
    url = _redis_url(redis_url)
    with _edge(choice):
        engine = _open(choice)
        transport = _connect_streams(url) if url is not None else None
        reconciler = Reconciler(
            engine,
            transport,
            _keys(partitions),
            ReconcilerConfig(redispatch_after=timedelta(seconds=redispatch_after)),
        )
        if once:
            try:
                summary = reconciler.run_pass()
            finally:
                engine.dispose()
    if once:
        if as_json:
            _print_json(summary.as_dict())
            return
        out = _stdout()
        if not summary.repairs:
            out.print(f"pass {summary.pass_id}: nothing to repair ({summary.duration_ms:.1f} ms)")
            return
        out.print(f"pass {summary.pass_id}: {summary.total} repairs ({summary.duration_ms:.1f} ms)")
        for kind, count in sorted(summary.repairs.items()):
            out.print(f"  {kind:<16} {count}")
        if summary.more_to_repair:
            out.print("  more to repair than one pass takes: the next pass goes on from here")
        return
    logs.configure()
    runner = Runner()
    runner.add("reconciler", lambda stop: reconciler.run(stop, interval))
    try:
        code = runner.run_until_signalled(0)
    finally:
        engine.dispose()
    raise typer.Exit(code)


def _duration(text: str) -> float:
    """Seconds from "5s", "500ms", "1m" or a bare number of seconds."""
    raw = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if raw.endswith(suffix):
            raw, scale = raw[: -len(suffix)], factor
            break
    else:
        scale = 1.0
    try:
        value = float(raw) * scale
    except ValueError:
        _fail(f"--every must look like 5s, 500ms or 1m, got {text!r}", EXIT_USAGE)
    if value <= 0:
        _fail(f"--every must be positive, got {text!r}", EXIT_USAGE)
    return value


def main() -> None:
    """The console script's entry point."""
    app(prog_name="streamflow")


# Command groups in their own modules register themselves on `app` when imported; this
# comes last because they use the helpers above.
import streamflow.commands  # noqa: E402, F401
