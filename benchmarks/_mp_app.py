"""The worker the multi-process benchmark runs: does nothing but note who ran it.

One short O_APPEND line per perform (workflow, step, attempt, pid), so the benchmark
counts every step's runs across processes — "no step ran twice" is counted, not assumed
— and sees which worker process handled what.
"""

from __future__ import annotations

import os
from typing import Any

from streamflow import Worker
from streamflow.engine.context import StepContext


class Note(Worker):
    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        line = f"{ctx.workflow_id} {ctx.step} {ctx.attempt} {os.getpid()}\n"
        with open(ctx.workflow_context["log"], "a", encoding="utf-8") as f:
            f.write(line)
        return 1
