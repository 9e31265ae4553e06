"""What a chaos run found, as text for people and JSON for machines.

The text report shows, in order: faults injected per kind and stream, process faults,
repairs made per kind (`streamflow_recoveries`), evidence rows per kind/classification
(`streamflow_evidence`), how every fault was matched to the rows that make it visible
(both sides counted), the time to converge, and each invariant with PASS or FAIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.invariants import FaultMatching, InvariantResult


@dataclass(frozen=True, slots=True)
class ProcessFault:
    kind: str
    #: Epoch seconds.
    at: float
    #: Share of the workload's steps finished when it fired.
    progress: float
    detail: str


@dataclass(frozen=True, slots=True)
class RunSummary:
    role: str
    converge_s: float | None
    #: Until every injected fault was visible in the ledger (chaos run only).
    settle_s: float | None
    performs: int
    passes: int
    log_dir: str


@dataclass
class Report:
    scenario: str
    options: dict[str, Any]
    faults_described: str
    workload: str
    reference: RunSummary
    chaos: RunSummary
    #: kind -> stream -> faults that took effect
    faults: dict[str, dict[str, int]]
    replays_not_sent: int
    process_faults: list[ProcessFault]
    repairs: dict[str, int]
    #: Repairs per kind as the reconciler's pass summaries counted them.
    pass_repairs: dict[str, int]
    evidence: dict[str, int]
    matching: FaultMatching
    invariants: list[InvariantResult]
    #: Where logs, fault log and perform logs were kept (when kept).
    log_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.invariants)

    @property
    def failed(self) -> list[InvariantResult]:
        return [i for i in self.invariants if not i.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "passed": self.passed,
            "options": self.options,
            "faults_described": self.faults_described,
            "workload": self.workload,
            "reference": asdict(self.reference),
            "chaos": asdict(self.chaos),
            "faults": self.faults,
            "replays_not_sent": self.replays_not_sent,
            "process_faults": [asdict(p) for p in self.process_faults],
            "repairs": self.repairs,
            "pass_repairs": self.pass_repairs,
            "evidence": self.evidence,
            "matching": self.matching.to_dict(),
            "invariants": [i.to_dict() for i in self.invariants],
            "log_dir": self.log_dir,
        }

    def render(self) -> str:
        return "\n".join(_render(self))


def _s(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "never"


def _table(rows: Sequence[tuple[str, ...]], indent: str = "  ") -> list[str]:
    if not rows:
        return [f"{indent}(none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *rest]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _render(r: Report) -> list[str]:
    o = r.options
    lines = [
        f"Streamflow chaos run [{r.scenario}] — seed {o['seed']}, {r.workload}",
        f"faults: {r.faults_described}",
        f"engine: {o['workers']} workers x {o['concurrency']}, reconcile every "
        f"{o['reconcile_every']}s, redispatch after {o['redispatch_after']}s, "
        f"dropped after {o['dropped_after']}s, lease {o['lease_seconds']}s",
        "",
    ]
    kinds = ["drop", "delay_unreleased", "duplicate", "delay", "replay", "reorder"]
    rows = [
        (f"  {k}", str(r.faults[k].get("completion", 0)), str(r.faults[k].get("ready", 0)))
        for k in kinds
        if k in r.faults
    ]
    if rows:
        lines += _table([("faults injected", "completion", "ready"), *rows], "")
    else:
        lines.append("faults injected: none")
    if r.replays_not_sent:
        lines.append(f"  ({r.replays_not_sent} replays scheduled but never sent: process stopped)")
    if r.process_faults:
        lines += ["", "process faults"]
        lines += [f"  {p.kind:<14} at {p.progress:>4.0%}  {p.detail}" for p in r.process_faults]
    lines += ["", "repairs made (streamflow_recoveries rows; reconciler pass summaries)"]
    kinds = sorted(set(r.repairs) | set(r.pass_repairs))
    lines += _table(
        [(k, str(r.repairs.get(k, 0)), f"{r.pass_repairs.get(k, 0)} in passes") for k in kinds]
    )
    lines += ["", "evidence rows (streamflow_evidence, kind/classification)"]
    lines += _table([(k, str(v)) for k, v in r.evidence.items()])
    m = r.matching
    lines += ["", f"faults matched to rows: {m.matched} of {m.injected}"]
    table = [("fault", "injected", "matched", "answered by")]
    table += [
        (f"{x.stream} {x.kind}", str(x.injected), str(x.matched), x.answered_by) for x in m.lines
    ]
    lines += _table(table)
    for x in m.lines:
        for why, n in x.notes.items():
            lines.append(f"    {x.stream} {x.kind}: {n} {why}")
    lines += ["  rows side (rows of each class; how many answered an injected fault):"]
    lines += _table(
        [(row.rows, f"{row.total} rows", f"{row.used} for faults") for row in m.rows], "    "
    )
    if r.chaos.settle_s is not None:
        visible = f"every fault visible after {_s(r.chaos.settle_s)}"
    elif r.chaos.converge_s is not None:
        visible = "faults never all visible"
    else:
        visible = "no convergence"

    lines += [
        "",
        f"time to converge: reference {_s(r.reference.converge_s)}, chaos {_s(r.chaos.converge_s)}"
        f"; {visible}",
        f"performs: reference {r.reference.performs}, chaos {r.chaos.performs}; "
        f"reconciler passes in the chaos run: {r.chaos.passes}",
        "",
        "invariants",
    ]
    for i in r.invariants:
        lines.append(f"  {'PASS' if i.passed else 'FAIL'}  {i.title}  ({i.summary})")
        lines += [f"          {p}" for p in i.problems]
    lines += ["", f"RESULT: {'PASS' if r.passed else 'FAIL'}"]
    if r.log_dir:
        lines.append(f"logs kept in {r.log_dir}")
    return lines


def render_matrix(reports: list[Report]) -> str:
    """One line per scenario, then each failing scenario's full report."""
    rows = [("scenario", "faults", "matched", "converge", "settle", "result")]
    for r in reports:
        rows.append(
            (
                r.scenario,
                str(r.matching.injected),
                str(r.matching.matched),
                _s(r.chaos.converge_s),
                _s(r.chaos.settle_s),
                "PASS" if r.passed else "FAIL: " + ", ".join(i.name for i in r.failed),
            )
        )
    lines = ["Streamflow chaos matrix", *_table(rows)]
    for r in reports:
        if not r.passed:
            lines += ["", r.render()]
    passed = all(r.passed for r in reports)
    lines += ["", f"MATRIX: {'PASS' if passed else 'FAIL'} ({len(reports)} scenarios)"]
    return "\n".join(lines)
