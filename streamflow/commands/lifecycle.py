"""Lifecycle commands: `cancel` (and, in this module too, `signal`).

They write to the ledger only — like `Workflow.insert` and `Workflow.complete_step`, the
ledger is the outbox: steps a signal releases are dispatched by the consumer's dispatcher,
and workers learn of a cancel when they next renew their lease. Bad input (an unknown
workflow, a malformed payload) ends in one red line and exit code 2; trouble with the
database in exit code 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.markup import escape

from ledger import operations
from ledger.errors import WorkflowNotFoundError
from streamflow.cli import (
    EXIT_USAGE,
    CliError,
    DatabaseUrlOption,
    JsonOption,
    _choose,
    _edge,
    _open,
    _print_json,
    _stdout,
    app,
)

WorkflowIdArgument = Annotated[
    str, typer.Argument(help="The workflow's id.", metavar="WORKFLOW_ID", show_default=False)
]


@contextmanager
def _unknown_is_bad_input() -> Iterator[None]:
    try:
        yield
    except WorkflowNotFoundError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@app.command()
def cancel(
    workflow_id: WorkflowIdArgument,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Why, kept with the request.", show_default=False),
    ] = None,
    requested_by: Annotated[
        str | None,
        typer.Option(
            "--requested-by",
            help="Who asks (default: cli), kept with the request.",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a workflow: every step that has not finished is cancelled.

    The request is kept as a row of its own, every time (a repeat too). Running steps have
    their lease revoked: the worker sees `ctx.cancel_requested()` at its next lease renewal,
    and whatever it reports afterwards is recorded as `late` and changes nothing. The
    workflow's outcome becomes `cancelled`. A workflow that already finished keeps its
    outcome; the request is recorded all the same.

    **Example:** `streamflow cancel 01a213c9f22a43d4130de5f1c9ef1b34 --reason "order withdrawn"`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            with _unknown_is_bad_input():
                result = operations.cancel(
                    engine,
                    workflow_id,
                    reason=reason,
                    requested_by=requested_by or "cli",
                    source="cli",
                )
        finally:
            engine.dispose()
    if as_json:
        _print_json(result.to_dict())
        return
    out = _stdout()
    if result.effect == "applied":
        out.print(
            f"workflow {escape(workflow_id)} cancelled "
            f"(request {result.request_id}); {len(result.cancelled)} steps cancelled"
            + (f": {escape(', '.join(result.cancelled))}" if result.cancelled else "")
        )
        if result.revoked:
            out.print(
                "leases revoked (their workers stop at the next renewal): "
                + escape(", ".join(result.revoked))
            )
    elif result.effect == "repeated":
        out.print(
            f"workflow {escape(workflow_id)} was already cancelled; request "
            f"{result.request_id} recorded, nothing else changed"
        )
    else:
        out.print(
            f"workflow {escape(workflow_id)} had already finished with outcome "
            f"{result.workflow_outcome}, which stands; request {result.request_id} recorded"
        )
