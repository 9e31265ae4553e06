"""The worker the chaos suite's workflows run, in real `streamflow worker` processes.

Its outcome is a pure function of its args and the attempt number, so a fault-free
reference run and a chaos run of the same workload must end the same way:

    {"base": 1, "values": [2, 3]}       -> returns 6 (None values, from a `continue`
                                           dependency that ended without a result, count 0)
    {"fail_until": 3, ...}              -> raises on attempts 1 and 2, then returns
    {"always": "fail"}                  -> raises every time (failed once attempts run out)
    {"always": "cancel"}                -> raises Cancel: the step is cancelled
    {"sleep_ms": 20}                    -> sleeps first, so faults land mid-step

The result never includes the attempt number: a worker SIGKILLed mid-step costs an
attempt, and that must not change what the step returns.

Every `perform` appends a `start` line (and an `end` line when it returns normally) to the
file named by the workflow context's "log", with the time, so the invariants can count
runs per attempt across processes and check that no step started before its
dependencies finished.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from streamflow import Worker
from streamflow.engine.context import Cancel, StepContext

#: The queues chaos workflows use; chaos workers listen on all of them.
QUEUES = ("chaos", "chaos-io")


def _note(ctx: StepContext, phase: str) -> None:
    path = ctx.workflow_context.get("log")
    if not path:
        return
    line = json.dumps(
        {
            "wf": ctx.workflow_id,
            "index": ctx.workflow_context.get("chaos_index"),
            "step": ctx.step,
            "attempt": ctx.attempt,
            "phase": phase,
            "t": time.time(),
            "pid": os.getpid(),
        }
    )
    # One short write on an O_APPEND descriptor lands whole, whichever process writes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_perform_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class ChaosStep(Worker):
    """Deterministic work: sum numbers, fail on purpose, or cancel, as its args say."""

    queue = "chaos"
    max_attempts = 3

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx, "start")
        sleep_ms = args.get("sleep_ms", 0)
        if sleep_ms:
            time.sleep(sleep_ms / 1000)
        always = args.get("always")
        if always == "cancel":
            raise Cancel("cancelled on purpose")
        if always == "fail":
            raise RuntimeError(f"{ctx.step} always fails (attempt {ctx.attempt})")
        if ctx.attempt < args.get("fail_until", 0):
            raise RuntimeError(f"{ctx.step} fails on attempt {ctx.attempt} on purpose")
        value = int(args.get("base") or 0) + sum(int(v or 0) for v in args.get("values", []))
        _note(ctx, "end")
        return value
