"""`streamflow chaos`: the chaos suite (chaos/), from the main command line."""

from __future__ import annotations

import importlib

import typer

from streamflow.cli import app


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def chaos(ctx: typer.Context) -> None:
    """Run workflows through real processes while injecting faults; check the invariants.

    Starts its own throwaway PostgreSQL database and redis-server, runs a fault-free
    reference run and a chaos run of the same seeded workflows, and prints faults
    injected per kind, repairs, evidence, time to converge and each invariant with PASS
    or FAIL. Exits 1 on any FAIL. All options are those of `python -m chaos --help`.

    **Example:** `streamflow chaos --workflows 200 --drop 0.3 --dup 0.2 --seed 7`
    """
    # Imported only when asked for: the suite is not part of running workflows.
    main = importlib.import_module("chaos.__main__").main
    raise typer.Exit(main(list(ctx.args)))
