"""Streamflow's chaos suite: real processes, injected faults, invariants checked.

`run_chaos(ChaosOptions(...)) -> Report` runs a fault-free reference run and a chaos run of
the same seeded workload and checks the design's invariants; `run_matrix` runs every
fault kind in turn. `python -m chaos --help` is the command line; docs/chaos.md the guide.

Engine processes import `chaos.faults` (through `streamflow.streams.seam`) when
`STREAMFLOW_CHAOS` is set, which imports this package first; so the names below are loaded
on first use, and an engine process never loads the harness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chaos.harness import ChaosOptions, run_chaos, run_matrix
    from chaos.report import Report

__all__ = ["ChaosOptions", "Report", "run_chaos", "run_matrix"]


def __getattr__(name: str) -> Any:
    if name in ("ChaosOptions", "run_chaos", "run_matrix"):
        from chaos import harness

        return getattr(harness, name)
    if name == "Report":
        from chaos.report import Report

        return Report
    raise AttributeError(f"module 'chaos' has no attribute {name!r}")
