"""Lifecycle commands: `cancel` (and, in this module too, `signal`).

They write to the ledger only — like `Workflow.insert` and `Workflow.complete_step`, the
ledger is the outbox: steps a signal releases are dispatched by the consumer's dispatcher,
and workers learn of a cancel when they next renew their lease. Bad input (an unknown
workflow, a malformed payload) ends in one red line and exit code 2; trouble with the
database in exit code 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from ledger import operations
from ledger.errors import WorkflowNotFoundError
from ledger.signals import InvalidSignalError
from streamflow import telemetry
from streamflow.cli import (
    EXIT_USAGE,
    CliError,
    DatabaseUrlOption,
    JsonOption,
    _choose,
    _edge,
    _fail,
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
    """An id that names nothing, or a signal that cannot be recorded, is the caller's
    mistake: one line, exit code 2."""
    try:
        yield
    except (WorkflowNotFoundError, InvalidSignalError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def raise_usage(message: str) -> NoReturn:
    _fail(message, EXIT_USAGE)


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


@app.command()
def signal(
    workflow_id: WorkflowIdArgument,
    name: Annotated[
        str, typer.Argument(help="The signal's name.", metavar="NAME", show_default=False)
    ],
    payload: Annotated[
        str, typer.Option("--payload", help="The signal's payload as JSON.")
    ] = "null",
    dedupe_key: Annotated[
        str | None,
        typer.Option(
            "--dedupe-key",
            help="Repeats with the same key are duplicates (same payload) or ambiguous "
            "(different payload; the first stands).",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a workflow an external signal; it is kept, whatever it turns out to be.

    `consumed`: the step awaiting NAME was ready and is released now (its `ctx.signal` is
    the payload). `recorded`: the step's dependencies are not done yet; the signal is held
    and releases it when they are. `duplicate` / `ambiguous`: the dedupe key was used
    before with the same / another payload. `late`: the await already had its signal,
    expired, or its step ended. `unmatched`: no step of the workflow awaits NAME.

    **Example:** `streamflow signal 01a213c9f22a43d4130de5f1c9ef1b34 manager_approval
    --payload '{"approved": true, "by": "ann"}' --dedupe-key approval-7`
    """
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise_usage(f"--payload is not valid JSON: {exc}")
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            with _unknown_is_bad_input():
                result = operations.signal(
                    engine, workflow_id, name, value, dedupe_key=dedupe_key, source="cli"
                )
        finally:
            engine.dispose()
    telemetry.signal_recorded(
        workflow_name=result.workflow_name, classification=result.classification, source="cli"
    )
    if as_json:
        _print_json(result.to_dict())
        return
    out = _stdout()
    where = f" for step {escape(result.step)}" if result.step else ""
    why = f" ({escape(result.reason)})" if result.reason else ""
    out.print(f"signal {escape(name)}{where}: {result.classification}{why}")
    if result.released:
        out.print("released: " + escape(", ".join(result.released)))
