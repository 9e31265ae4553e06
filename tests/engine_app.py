"""Worker classes the engine tests run in real worker processes.

Every `perform` appends one line to the file named by the workflow context's "log", so
a test can count exactly how often each step ran, per attempt, across processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from streamflow import Worker
from streamflow.engine.context import Cancel, StepContext


def _note(ctx: StepContext, **extra: Any) -> None:
    path = ctx.workflow_context.get("log")
    if not path:
        return
    line = json.dumps(
        {
            "wf": ctx.workflow_id,
            "step": ctx.step,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            **extra,
        }
    )
    # O_APPEND writes of a short line land whole, whichever process writes.
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def perform_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Echo(Worker):
    """Returns its args plus what its dependencies returned."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        return {"args": args, "deps": sorted(ctx.results)}


class CountsItsThread(Worker):
    """Notes which thread ran it and how many steps that thread has run so far."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        thread: Any = threading.current_thread()
        thread.steps_run = getattr(thread, "steps_run", 0) + 1
        _note(ctx, thread=thread.name, thread_steps=thread.steps_run)
        return None


class Gated(Worker):
    """Counts the steps performing at this moment (in this process), remembers the most
    seen at once, and holds until `GATE` opens (or its step is cancelled): a test can
    see how many steps a worker performs at once and how many it holds claimed."""

    GATE = threading.Event()
    lock = threading.Lock()
    performing = 0
    peak = 0

    @classmethod
    def reset(cls) -> None:
        cls.GATE = threading.Event()
        with cls.lock:
            cls.performing = cls.peak = 0

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        cls = type(self)
        with cls.lock:
            cls.performing += 1
            cls.peak = max(cls.peak, cls.performing)
        _note(ctx)
        try:
            deadline = time.monotonic() + 10
            while not cls.GATE.wait(0.01) and not ctx.cancel_requested():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never opened the gate")
        finally:
            with cls.lock:
                cls.performing -= 1
        return None


class Exits(Worker):
    """Calls sys.exit() from inside the step."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        raise SystemExit(3)


class Add(Worker):
    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        return args.get("base", 0) + sum(args.get("values", []))


class AsyncDouble(Worker):
    async def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        await asyncio.sleep(0)
        return args["value"] * 2


class FailsUntil(Worker):
    """Raises until attempt `succeed_on`; retries are fast in tests via max_attempts."""

    max_attempts = 3

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        if ctx.attempt < args.get("succeed_on", 10**6):
            raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
        return {"succeeded_on": ctx.attempt}


class Explode(Worker):
    max_attempts = 1

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        raise ValueError("exploded on purpose")


class CancelsItself(Worker):
    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        raise Cancel("not needed any more")


class SleepsFirstTime(Worker):
    """Attempt 1 sleeps (so a test can kill its worker mid-step); later attempts return."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx)
        if ctx.attempt == 1:
            time.sleep(args.get("seconds", 60))
        return {"attempt": ctx.attempt}


class Sleeps(Worker):
    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx, phase="start")
        time.sleep(args.get("seconds", 1))
        _note(ctx, phase="end")
        return "slept"


class WaitsForCancel(Worker):
    """Runs until `ctx.cancel_requested()` (bounded by `seconds`), then returns a result —
    which, for a cancelled workflow, arrives late."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx, phase="start")
        started = time.monotonic()
        deadline = started + args.get("seconds", 30)
        while not ctx.cancel_requested() and time.monotonic() < deadline:
            time.sleep(0.02)
        noticed = ctx.cancel_requested()
        _note(ctx, phase="end", noticed_cancel=noticed, at=time.time())
        return {"noticed_cancel": noticed}


class Notify(Worker):
    """An `on_finish` callback: logs what its context says about the finished workflow."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(
            ctx,
            phase="callback",
            outcome=ctx.workflow_outcome,
            counters=ctx.counters,
            results=sorted(ctx.results),
            args=args,
        )
        return {"notified": ctx.workflow_outcome, "to": args.get("to")}


class EchoSignal(Worker):
    """Returns (and logs) the payload of the signal that released it."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _note(ctx, phase="signalled", signal=ctx.signal)
        return {"signal": ctx.signal}
