"""`streamflow prune`: delete (optionally archive first) workflows finished long ago.

The work is `ledger.prune`'s: batches of finished workflows, each in its own short
transaction that skips any workflow another transaction holds. This module parses the
options, keeps the archive file honest (each batch's lines are on disk before its deletes
commit), reports progress on stderr and the totals on stdout.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ledger.db import read
from ledger.prune import PruneCounts, count_prunable, prune
from streamflow.cli import (
    EXIT_USAGE,
    CliError,
    DatabaseUrlOption,
    JsonOption,
    _choose,
    _edge,
    _open,
    _print_json,
    _stderr,
    _stdout,
    app,
)
from streamflow.commands.operator import _whole, parse_duration

DEFAULT_BATCH = 500
MAX_BATCH = 10_000


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON-safe: {type(value).__name__}")


class ArchiveFile:
    """A JSON-lines file that one line per workflow is appended to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.handle: IO[str] = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write the archive {path}: {exc.strerror}", EXIT_USAGE) from None
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, default=_jsonable, sort_keys=True) + "\n")
        self.lines += 1

    def sync(self) -> None:
        """On disk before the batch's deletes commit."""
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _progress(batch: PruneCounts, total: PruneCounts) -> None:
    if batch.workflows:
        steps = batch.rows.get("streamflow_steps", 0)
        _stderr().print(
            f"pruned {batch.workflows} workflows ({steps} steps); {total.workflows} so far",
            soft_wrap=True,
        )
    else:
        _stderr().print(
            f"pruned {batch.reconciler_passes} reconciler pass summaries; "
            f"{total.reconciler_passes} so far",
            soft_wrap=True,
        )


def _render(counts: PruneCounts, *, dry_run: bool, cutoff: datetime) -> None:
    console = _stdout()
    verb = "would prune" if dry_run else "pruned"
    console.print(
        f"{verb} {counts.workflows} workflows finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC "
        f"and {counts.reconciler_passes} reconciler pass summaries",
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False)
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, n in counts.rows.items():
        table.add_row(escape(name), str(n))
    table.add_row("streamflow_reconciler_passes", str(counts.reconciler_passes))
    console.print(table)


@app.command(name="prune")
def prune_command(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Prune workflows whose outcome was recorded longer ago than this, "
            "e.g. 30d, 12h, 2w.",
            show_default=False,
        ),
    ],
    batch_size: Annotated[
        str,
        typer.Option(
            "--batch-size",
            help=f"Workflows per transaction (1 to {MAX_BATCH}).",
        ),
    ] = str(DEFAULT_BATCH),
    archive_to: Annotated[
        Path | None,
        typer.Option(
            "--archive-to",
            help="Append every pruned workflow's rows to this JSON-lines file first, "
            "one line per workflow.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be pruned.")
    ] = False,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete finished workflows older than a cutoff, in small batches.

    A workflow goes once its final outcome was recorded before the cutoff (and its
    `on_finish` callback is no longer running), with every row it has in every streamflow
    table; running workflows are never touched. Each batch is a short transaction that
    skips workflows another transaction holds, so workers and consumers never wait on it.
    Reconciler pass summaries older than the cutoff go too (the newest one always stays).
    Progress goes to stderr.

    **Example:** `streamflow prune --older-than 30d --archive-to old-workflows.jsonl`
    """
    with _edge():
        age = parse_duration(older_than, "--older-than")
        size = _whole(batch_size, "--batch-size", maximum=MAX_BATCH)
    choice = _choose(database_url)
    with _edge(choice):
        cutoff = datetime.now(UTC) - age
        engine = _open(choice)
        archive = ArchiveFile(archive_to) if archive_to is not None and not dry_run else None
        try:
            if dry_run:
                with read(engine) as conn:
                    counts = count_prunable(conn, cutoff)
            else:
                counts = prune(
                    engine,
                    cutoff,
                    size,
                    archive=archive.write if archive is not None else None,
                    before_commit=archive.sync if archive is not None else None,
                    on_batch=_progress,
                )
        finally:
            engine.dispose()
            if archive is not None:
                archive.close()
    if as_json:
        _print_json(
            {
                "dry_run": dry_run,
                "cutoff": cutoff.isoformat(),
                "batch_size": size,
                "archive": str(archive_to) if archive is not None else None,
                "archived": archive.lines if archive is not None else 0,
                **counts.as_dict(),
            }
        )
        return
    _render(counts, dry_run=dry_run, cutoff=cutoff)
    if archive is not None:
        _stdout().print(f"archived {archive.lines} workflows to {escape(str(archive_to))}")
