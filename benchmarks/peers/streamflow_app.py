"""The benchmark's Worker for `streamflow worker --app benchmarks.peers.streamflow_app`."""

from __future__ import annotations

from typing import Any

from benchmarks.workloads import Workload
from benchmarks.workloads.body import run_step
from streamflow import Workflow
from streamflow.engine.context import StepContext
from streamflow.worker import Worker


class Step(Worker):
    """Takes its dependencies' results (from the ledger, via ctx), returns a number."""

    queue = "default"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        inputs = [ctx.results[name] for name in sorted(ctx.results)]
        return run_step(ctx.step, int(args["i"]), inputs)


def build(workload: Workload, i: int) -> Workflow:
    wf = Workflow.new(name=f"bench_{workload.shape}")
    names = workload.step_names()
    parents: dict[str, list[str]] = {name: [] for name in names}
    for parent, child in workload.edges():
        parents[child].append(parent)
    for name in names:
        wf = wf.add(name, Step.new({"i": i}), deps=parents[name])
    return wf
