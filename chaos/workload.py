"""A seeded mix of workflows for the chaos suite.

The same `(count, seed)` always builds the same workflows, step for step and arg for arg,
so the fault-free reference run and the chaos run execute the same work. Each workflow's
context carries its position in the mix (`chaos_index`), which is how the two runs'
workflows (with different ids) are paired up, and the perform log path.

Shapes (by weight):

- `chain`    — 2 to 5 steps, each adding to the previous step's result;
- `fan`      — a root, 2 to 6 parallel children of it, a join summing their results;
- `retry`    — a step failing on its first 1 or 2 attempts, then a child of it;
- `failure`  — a step that always fails: its cancel-edge descendants are cascade-cancelled,
               a `continue` cleanup still runs, an unrelated step completes;
- `cancel`   — a step cancelling itself, with a cancel-edge and a `continue` child;
- `diamond`  — a -> (b fails, c) -> d, where d follows b through a `continue` edge.

Every step has a little `sleep_ms` so faults land while work is in flight. Attempt
budgets leave `attempt_slack` spare attempts, so a SIGKILLed worker (which costs the
steps it was running one attempt each) changes no outcome.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from chaos.workers import QUEUES, ChaosStep
from streamflow import Dep, Workflow

SHAPES: tuple[tuple[str, float], ...] = (
    ("chain", 0.30),
    ("fan", 0.25),
    ("retry", 0.20),
    ("failure", 0.10),
    ("cancel", 0.05),
    ("diamond", 0.10),
)


@dataclass(frozen=True, slots=True)
class WorkloadItem:
    index: int
    shape: str
    workflow: Workflow
    #: The outcome the shape is designed to end with.
    expected_outcome: str

    @property
    def step_count(self) -> int:
        return len(self.workflow.steps)


class _Builder:
    def __init__(self, rng: random.Random, context: dict[str, Any], slack: int) -> None:
        self.rng = rng
        self.wf = Workflow.new("", context)
        self.slack = slack

    def step(
        self,
        name: str,
        deps: list[str | Dep] | None = None,
        *,
        max_attempts: int | None = None,
        **args: Any,
    ) -> None:
        args.setdefault("sleep_ms", self.rng.randint(5, 30))
        queue = QUEUES[0] if self.rng.random() < 0.7 else QUEUES[1]
        job = ChaosStep.new(
            args, queue=queue, max_attempts=max_attempts or ChaosStep.max_attempts + self.slack
        )
        self.wf = self.wf.add(name, job, deps=deps or [])


def _chain(b: _Builder, i: int) -> str:
    length = b.rng.randint(2, 5)
    b.step("s0", base=i)
    for k in range(1, length):
        b.step(f"s{k}", [f"s{k - 1}"], base=Workflow.result(f"s{k - 1}"), values=[k])
    return "completed"


def _fan(b: _Builder, i: int) -> str:
    width = b.rng.randint(2, 6)
    b.step("root", base=i)
    for k in range(width):
        b.step(f"p{k}", ["root"], base=Workflow.result("root"), values=[k])
    parts = [f"p{k}" for k in range(width)]
    b.step("join", list(parts), values=[Workflow.result(p) for p in parts])
    return "completed"


def _retry(b: _Builder, i: int) -> str:
    fails = b.rng.randint(1, 2)
    b.step("flaky", base=i, fail_until=fails + 1, max_attempts=fails + 1 + b.slack)
    b.step("next", ["flaky"], base=Workflow.result("flaky"), values=[1])
    return "completed"


def _failure(b: _Builder, i: int) -> str:
    b.step("work", always="fail", max_attempts=b.rng.randint(1, 2))
    b.step("after", ["work"], base=Workflow.result("work"))
    b.step("after2", ["after"], base=Workflow.result("after"))
    b.step("cleanup", [Dep("work", policy="continue")], values=[Workflow.result("work"), i])
    b.step("side", base=i)
    return "failed"


def _cancel(b: _Builder, i: int) -> str:
    b.step("stop", always="cancel")
    b.step("child", ["stop"], base=i)
    b.step("finally", [Dep("stop", policy="continue")], base=i)
    return "failed"


def _diamond(b: _Builder, i: int) -> str:
    b.step("a", base=i)
    b.step("b", ["a"], always="fail", max_attempts=1)
    b.step("c", ["a"], base=Workflow.result("a"), values=[2])
    b.step(
        "d",
        [Dep("b", policy="continue"), "c"],
        values=[Workflow.result("b"), Workflow.result("c")],
    )
    return "failed"


_BUILDERS = {
    "chain": _chain,
    "fan": _fan,
    "retry": _retry,
    "failure": _failure,
    "cancel": _cancel,
    "diamond": _diamond,
}


def build_workload(
    count: int,
    seed: int,
    log_path: str,
    *,
    attempt_slack: int = 1,
    shapes: tuple[str, ...] = (),
) -> list[WorkloadItem]:
    """`count` workflows drawn with `seed` (only of `shapes`, if given); each logs its
    performs to `log_path`."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    unknown = sorted(set(shapes) - set(_BUILDERS))
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; use {sorted(_BUILDERS)}")
    rng = random.Random(f"workload:{seed}")
    chosen = [(name, w) for name, w in SHAPES if not shapes or name in shapes]
    names = [name for name, _ in chosen]
    weights = [w for _, w in chosen]
    items = []
    for i in range(count):
        # The first workflows cycle through every shape, so even a small mix has each.
        shape = names[i] if i < len(names) else rng.choices(names, weights)[0]
        b = _Builder(rng, {"log": log_path, "chaos_index": i}, attempt_slack)
        expected = _BUILDERS[shape](b, i)
        wf = Workflow(f"chaos-{shape}", b.wf.workflow_context, b.wf.steps)
        items.append(WorkloadItem(i, shape, wf, expected))
    return items


def describe(items: list[WorkloadItem]) -> str:
    shapes = Counter(item.shape for item in items)
    steps = sum(item.step_count for item in items)
    mix = ", ".join(f"{shapes[name]} {name}" for name, _ in SHAPES if shapes[name])
    return f"{len(items)} workflows, {steps} steps ({mix})"
