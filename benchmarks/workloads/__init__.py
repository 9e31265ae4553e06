"""The workloads every system runs, their DAG shapes, and what a run of one yields.

Each step body is trivial and the same everywhere (`benchmarks.workloads.body`): it takes
its inputs, returns a number, and appends one timing line `wf step t0 t1` to the file
named by BENCH_TIMING_FILE, so hops and end-to-end latency come from the same clock for
every system.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Workload:
    key: str  # "w1", "w2", "w3", "w4@50%"
    title: str
    shape: str  # "chain" (s0 -> s1 -> ...) or "fan" (root -> m0..m{width-1} -> join)
    width: int  # chain length, or the number of parallel steps
    workflows: int
    #: Open-loop arrivals per second (None: submit every workflow at once).
    rate: float | None = None
    #: For open loop: the share of W1's maximum this rate is (reported only).
    load: float | None = None

    @property
    def steps_per_workflow(self) -> int:
        return self.width if self.shape == "chain" else self.width + 2

    @property
    def steps(self) -> int:
        return self.workflows * self.steps_per_workflow

    def step_names(self) -> list[str]:
        if self.shape == "chain":
            return [f"s{k}" for k in range(self.width)]
        return ["root", *(f"m{j}" for j in range(self.width)), "join"]

    def edges(self) -> list[tuple[str, str]]:
        """(parent, child) pairs."""
        names = self.step_names()
        if self.shape == "chain":
            return list(itertools.pairwise(names))
        mids = names[1:-1]
        return [("root", m) for m in mids] + [(m, "join") for m in mids]

    @property
    def last_step(self) -> str:
        return self.step_names()[-1]

    def expected_result(self, i: int) -> int:
        """What the last step returns for workflow i: every system must get it right."""
        if self.shape == "chain":
            return i + self.width - 1
        return sum(i + j for j in range(self.width))

    def arrivals(self) -> list[float]:
        """Intended submit offsets in seconds from the start (open loop: evenly spaced)."""
        if self.rate is None:
            return [0.0] * self.workflows
        return [k / self.rate for k in range(self.workflows)]

    def at_rate(self, key: str, rate: float, load: float, seconds: float) -> Workload:
        return replace(
            self,
            key=key,
            rate=rate,
            load=load,
            workflows=max(2, round(rate * seconds)),
            title=f"W4 open loop at {load:.0%} of each system's own W1 maximum",
        )


@dataclass(frozen=True)
class Sizes:
    w1: int
    w2: int
    w3: int
    w4_seconds: float
    repeats: int


def workloads(sizes: Sizes) -> list[Workload]:
    return [
        Workload("w1", f"W1 {sizes.w1} x chain A->B->C", "chain", 3, sizes.w1),
        Workload("w2", f"W2 {sizes.w2} x root->10 parallel->join", "fan", 10, sizes.w2),
        Workload("w3", f"W3 one {sizes.w3}-step chain alone", "chain", sizes.w3, 1),
    ]


@dataclass
class Outcome:
    """What one run of one workload on one system measured (times are epoch seconds)."""

    workload: str
    steps: int
    workflows: int
    first_submit: float
    last_finish: float
    #: per workflow: finish - intended start, ms
    latencies_ms: list[float] = field(default_factory=list)
    #: per DAG edge: child start - parent finish (ours: parent's ledger commit), ms
    hops_ms: list[float] = field(default_factory=list)
    #: the latest a submission went out behind its intended time (open loop honesty), ms
    max_submit_lag_ms: float = 0.0
    wrong_results: int = 0

    @property
    def wall_s(self) -> float:
        return max(self.last_finish - self.first_submit, 1e-9)
