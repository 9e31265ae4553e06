"""The invariants every chaos run checks, against the ledger and the reference run.

From docs and `../shared/DESIGN.md` ("Invariants every test and chaos run checks"):

1. `perform` starts at most once per attempt (counted from the perform log every worker
   process appends to, so across processes, not assumed);
2. a completed step has exactly one stored result, from the attempt that completed it,
   and that attempt really ran;
3. no step ran while a dependency was unsatisfied (its first `perform` started after every
   dependency finished, each in a state its edge accepts; cascade-cancelled steps never
   ran), and no step was released twice (at most one `release` repair per step, and no
   run before it);
4. every workflow's outcome, every step's final state and every stored result equal the
   fault-free reference run's;
5. every injected fault is visible afterwards as evidence or a recovery row, matched per
   kind and identity (see `match_faults`);
6. no write is lost: every workflow the API accepted is in the ledger with all its steps,
   finished, and its counters equal a recount of its steps.

Everything here reads a `LedgerSnapshot` (plain values taken from the ledger once the run
converged), the perform log and the fault log; nothing talks to processes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from ledger import tables as t

TERMINAL = frozenset({"completed", "failed", "cancelled"})
COUNTERS = ("pending", "available", "executing", "retryable", "completed", "failed", "cancelled")
#: Recovery rows that answer a lost ready message.
READY_REPAIRS = frozenset({"redispatch", "streams_reset", "pending_entry"})
#: Delivery evidence a repeated ready message leaves when it cannot claim its step.
DELIVERY_REPEATS = frozenset({"duplicate", "late", "replayed", "dead_letter"})
#: Why a delivery row says a stale ready message (from an earlier dispatch) claimed its
#: step: the dispatch it overtook was not needed, so a lost one leaves no recovery row.
STALE_CLAIM = "stale_message_claimed"
#: Event evidence for a completion event that arrived (dead-lettered ones too: a consumer
#: saw them, and the dead-letter row keeps the entry).
EVENT_ARRIVALS = frozenset({"consumed", "duplicate", "late", "unmatched", "dead_letter"})
#: How much earlier than a fault a row may be stamped and still answer it (clock
#: readings in different processes, rounding).
TOLERANCE_S = 0.05


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _dead_letter_key(classification: str, payload: Any) -> str | None:
    """A dead-lettered completion event's key, from the entry fields kept as evidence."""
    if classification != "dead_letter" or not isinstance(payload, dict):
        return None
    fields = payload.get("fields")
    key = fields.get("key") if isinstance(fields, dict) else None
    return key if isinstance(key, str) else None


# -- the ledger, as plain values ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    id: str
    index: int | None
    state: str
    outcome: str | None
    step_count: int
    counters: dict[str, int]


@dataclass(frozen=True, slots=True)
class StepRow:
    workflow_id: str
    name: str
    state: str
    attempt: int
    finished_at: float | None
    terminal_cause: str | None


@dataclass(frozen=True, slots=True)
class EvidenceRow:
    kind: str
    classification: str
    workflow_id: str
    step: str | None
    dedupe_key: str | None
    created_at: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryRow:
    repair: str
    workflow_id: str
    step: str | None
    created_at: float


@dataclass
class LedgerSnapshot:
    workflows: dict[str, WorkflowRow] = field(default_factory=dict)
    steps: dict[tuple[str, str], StepRow] = field(default_factory=dict)
    #: (workflow_id, child) -> [(parent, policy)]
    parents: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    #: (workflow_id, step) -> (attempt, payload)
    results: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    result_rows: int = 0
    evidence: list[EvidenceRow] = field(default_factory=list)
    recoveries: list[RecoveryRow] = field(default_factory=list)
    passes: int = 0
    #: Repairs per kind as the reconciler's pass summaries counted them (a streams reset
    #: counts there even when no step needed dispatching again, unlike recovery rows).
    pass_repairs: Counter[str] = field(default_factory=Counter)

    @classmethod
    def collect(cls, engine: Engine, *, full: bool = True) -> LedgerSnapshot:
        """Read the ledger; `full=False` reads only evidence and recoveries (cheap polls)."""
        snap = cls()
        e, rc = t.evidence, t.recoveries
        with engine.connect() as conn:
            snap.evidence = [
                EvidenceRow(
                    r.kind, r.classification, r.workflow_id, r.step,
                    r.dedupe_key or _dead_letter_key(r.classification, r.payload),
                    r.created_at.timestamp(), r.reason,
                )
                for r in conn.execute(
                    select(
                        e.c.kind, e.c.classification, e.c.workflow_id, e.c.step,
                        e.c.dedupe_key, e.c.created_at, e.c.payload, e.c.reason,
                    ).order_by(e.c.id)
                )
            ]  # fmt: skip
            snap.recoveries = [
                RecoveryRow(r.repair, r.workflow_id, r.step, r.created_at.timestamp())
                for r in conn.execute(
                    select(rc.c.repair, rc.c.workflow_id, rc.c.step, rc.c.created_at).order_by(
                        rc.c.id
                    )
                )
            ]
            if not full:
                return snap
            w, s, ed, rs = t.workflows, t.steps, t.edges, t.results
            for m in conn.execute(select(w)).mappings():
                index = m["context"].get("chaos_index") if isinstance(m["context"], dict) else None
                snap.workflows[m["id"]] = WorkflowRow(
                    m["id"],
                    index,
                    m["state"],
                    m["outcome"],
                    m["step_count"],
                    {name: m[f"{name}_count"] for name in COUNTERS},
                )
            for r in conn.execute(
                select(
                    s.c.workflow_id, s.c.name, s.c.state, s.c.attempt, s.c.finished_at,
                    s.c.terminal_cause,
                )
            ):  # fmt: skip
                snap.steps[(r.workflow_id, r.name)] = StepRow(
                    r.workflow_id, r.name, r.state, r.attempt, _ts(r.finished_at),
                    r.terminal_cause,
                )  # fmt: skip
            for g in conn.execute(select(ed.c.workflow_id, ed.c.child, ed.c.parent, ed.c.policy)):
                snap.parents.setdefault((g.workflow_id, g.child), []).append((g.parent, g.policy))
            for x in conn.execute(select(rs.c.workflow_id, rs.c.step, rs.c.attempt, rs.c.payload)):
                snap.results[(x.workflow_id, x.step)] = (x.attempt, x.payload)
            snap.result_rows = int(conn.execute(select(func.count()).select_from(rs)).scalar_one())
            p = t.reconciler_passes
            for summary in conn.execute(select(p.c.summary)).scalars():
                snap.passes += 1
                repairs = summary.get("repairs") if isinstance(summary, dict) else None
                if isinstance(repairs, dict):
                    snap.pass_repairs.update({str(k): int(v) for k, v in repairs.items()})
        return snap

    # -- summaries ---------------------------------------------------------------------

    def evidence_counts(self) -> Counter[str]:
        return Counter(f"{r.kind}/{r.classification}" for r in self.evidence)

    def repair_counts(self) -> Counter[str]:
        return Counter(r.repair for r in self.recoveries)

    def by_index(self) -> dict[int, WorkflowRow]:
        return {w.index: w for w in self.workflows.values() if w.index is not None}

    def steps_of(self, workflow_id: str) -> dict[str, StepRow]:
        return {name: row for (wf, name), row in self.steps.items() if wf == workflow_id}


# -- results of checks -------------------------------------------------------------------


@dataclass
class InvariantResult:
    name: str
    title: str
    passed: bool
    #: One line saying what was checked and how much.
    summary: str
    #: Up to a few lines naming what broke.
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "summary": self.summary,
            "problems": self.problems,
        }


MAX_PROBLEMS = 8


def _result(name: str, title: str, summary: str, problems: list[str]) -> InvariantResult:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return InvariantResult(name, title, not problems, summary, shown)


# -- the perform log -----------------------------------------------------------------------


@dataclass
class Performs:
    """The perform log, indexed."""

    starts: Counter[tuple[str, str, int]]
    #: (workflow_id, step) -> sorted start times
    start_times: dict[tuple[str, str], list[float]]

    @classmethod
    def of(cls, lines: Iterable[Mapping[str, Any]]) -> Performs:
        starts: Counter[tuple[str, str, int]] = Counter()
        times: dict[tuple[str, str], list[float]] = defaultdict(list)
        for line in lines:
            if line.get("phase") != "start":
                continue
            starts[(line["wf"], line["step"], int(line["attempt"]))] += 1
            times[(line["wf"], line["step"])].append(float(line["t"]))
        for v in times.values():
            v.sort()
        return cls(starts, dict(times))

    def started_since(self, workflow_id: str, step: str, since: float) -> bool:
        times = self.start_times.get((workflow_id, step), [])
        return any(ts >= since - TOLERANCE_S for ts in times)


# -- invariants 1-4 and 6 ----------------------------------------------------------------------


def check_perform_once(performs: Performs) -> InvariantResult:
    twice = sorted(k for k, n in performs.starts.items() if n > 1)
    problems = [f"{wf} {step} attempt {a}: perform started {performs.starts[(wf, step, a)]}x"
                for wf, step, a in twice]  # fmt: skip
    return _result(
        "perform_once",
        "perform starts at most once per attempt",
        f"{len(performs.starts)} attempts performed, {sum(performs.starts.values())} starts",
        problems,
    )


def check_results(snap: LedgerSnapshot, performs: Performs) -> InvariantResult:
    completed = {k: row.attempt for k, row in snap.steps.items() if row.state == "completed"}
    problems: list[str] = []
    for k, attempt in sorted(completed.items()):
        stored = snap.results.get(k)
        if stored is None:
            problems.append(f"{k[0]} {k[1]}: completed without a stored result")
        elif stored[0] != attempt:
            problems.append(f"{k[0]} {k[1]}: result from attempt {stored[0]}, step at {attempt}")
        elif performs.starts[(k[0], k[1], attempt)] != 1:
            problems.append(f"{k[0]} {k[1]}: completed attempt {attempt} has no logged perform")
    for k in sorted(set(snap.results) - set(completed)):
        problems.append(f"{k[0]} {k[1]}: a stored result but the step is {snap.steps[k].state}")
    if snap.result_rows != len(snap.results):
        problems.append(f"{snap.result_rows} result rows for {len(snap.results)} steps")
    return _result(
        "one_result",
        "each completed step has exactly one result",
        f"{len(completed)} completed steps, {snap.result_rows} stored results",
        problems,
    )


def check_dependencies(snap: LedgerSnapshot, performs: Performs) -> InvariantResult:
    problems: list[str] = []
    checked = 0
    for (wf, step), times in sorted(performs.start_times.items()):
        first = times[0]
        checked += 1
        for parent, policy in snap.parents.get((wf, step), []):
            p = snap.steps.get((wf, parent))
            if p is None or p.state not in TERMINAL or p.finished_at is None:
                problems.append(f"{wf} {step} ran but dependency {parent} is not finished")
            elif p.state != "completed" and policy != "continue":
                problems.append(f"{wf} {step} ran though {parent} ended {p.state} (cancel edge)")
            elif p.finished_at >= first:
                problems.append(
                    f"{wf} {step} started {p.finished_at - first:.3f}s before {parent} finished"
                )
    for (wf, step), row in sorted(snap.steps.items()):
        if row.terminal_cause == "cancelled_by_dependency" and (wf, step) in performs.start_times:
            problems.append(f"{wf} {step} was cascade-cancelled yet ran")
    releases = Counter((r.workflow_id, r.step) for r in snap.recoveries if r.repair == "release")
    for k, n in sorted(releases.items()):
        if n > 1:
            problems.append(f"{k[0]} {k[1]}: released {n} times by repairs")
    for r in snap.recoveries:
        if r.repair != "release" or r.step is None:
            continue
        times = performs.start_times.get((r.workflow_id, r.step), [])
        if times and times[0] < r.created_at - TOLERANCE_S:
            problems.append(f"{r.workflow_id} {r.step}: ran before the repair that released it")
    return _result(
        "dependencies",
        "no step ran before its dependencies were satisfied; none released twice",
        f"{checked} steps that ran, {sum(releases.values())} release repairs",
        problems,
    )


def check_no_write_lost(
    snap: LedgerSnapshot, inserted: Mapping[int, str], steps_per: Mapping[int, int]
) -> InvariantResult:
    problems: list[str] = []
    by_wf: dict[str, Counter[str]] = defaultdict(Counter)
    for (wf, _), step in snap.steps.items():
        by_wf[wf][step.state] += 1
    for index, wid in sorted(inserted.items()):
        row = snap.workflows.get(wid)
        if row is None:
            problems.append(f"#{index} {wid}: accepted by insert, missing from the ledger")
            continue
        states = by_wf.get(wid, Counter())
        if sum(states.values()) != steps_per[index] or row.step_count != steps_per[index]:
            problems.append(f"#{index} {wid}: {sum(states.values())} of {steps_per[index]} steps")
        if row.state != "finished":
            problems.append(f"#{index} {wid}: still {row.state}")
        recount = {name: states.get(name, 0) for name in row.counters}
        if recount != row.counters:
            problems.append(f"#{index} {wid}: counters {row.counters} but steps say {recount}")
    return _result(
        "no_write_lost",
        "no accepted write lost; every workflow finished; counters match the steps",
        f"{len(inserted)} workflows inserted, {sum(steps_per.values())} steps",
        problems,
    )


def check_same_as_reference(reference: LedgerSnapshot, chaos: LedgerSnapshot) -> InvariantResult:
    ref, run = reference.by_index(), chaos.by_index()
    problems: list[str] = []
    compared_steps = 0
    for index in sorted(set(ref) | set(run)):
        a, b = ref.get(index), run.get(index)
        if a is None or b is None:
            problems.append(f"#{index}: only in the {'chaos' if a is None else 'reference'} run")
            continue
        if a.outcome != b.outcome:
            problems.append(f"#{index}: outcome {b.outcome}, reference {a.outcome}")
        ref_steps, run_steps = reference.steps_of(a.id), chaos.steps_of(b.id)
        for name in sorted(set(ref_steps) | set(run_steps)):
            compared_steps += 1
            x, y = ref_steps.get(name), run_steps.get(name)
            if x is None or y is None:
                problems.append(f"#{index} {name}: missing from one run")
                continue
            if x.state != y.state:
                problems.append(f"#{index} {name}: {y.state}, reference {x.state}")
                continue
            rx, ry = reference.results.get((a.id, name)), chaos.results.get((b.id, name))
            if (rx is None) != (ry is None) or (rx and ry and rx[1] != ry[1]):
                problems.append(
                    f"#{index} {name}: result {ry[1] if ry else None!r}, "
                    f"reference {rx[1] if rx else None!r}"
                )
    outcomes = Counter(w.outcome for w in run.values())
    return _result(
        "same_outcome",
        "every workflow, step state and result equals the reference run's",
        f"{len(run)} workflows ({', '.join(f'{n} {o}' for o, n in sorted(outcomes.items()))}), "
        f"{compared_steps} steps compared",
        problems,
    )


def check_reference_as_designed(
    reference: LedgerSnapshot, expected: Mapping[int, str]
) -> InvariantResult:
    ref = reference.by_index()
    problems = [
        f"#{i}: reference run ended {ref[i].outcome if i in ref else 'missing'}, designed {want}"
        for i, want in sorted(expected.items())
        if i not in ref or ref[i].outcome != want
    ]
    return _result(
        "reference_sane",
        "the reference run ended as the workload was designed",
        f"{len(expected)} designed outcomes",
        problems,
    )


# -- invariant 5: every fault visible -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault as it took effect, from the fault log."""

    fault_id: str
    #: drop | duplicate | delay | replay | reorder, or "delay_unreleased" (a delayed
    #: message its process never sent: in effect dropped).
    kind: str
    stream: str
    workflow_id: str
    step: str
    key: str
    #: When it took effect: injected, or released/sent for delays and replays.
    t: float
    label: str
    #: The Redis stream key and the entries the message made (duplicates: both copies;
    #: replays: the original and the copy; released delays: the copy), to tell whether a
    #: Redis kill took them.
    stream_key: str = ""
    entry_ids: tuple[str, ...] = ()


@dataclass
class FaultLogSummary:
    faults: list[Fault]
    #: Replays scheduled but never sent (their process stopped first): nothing happened.
    replays_not_sent: int = 0
    #: Delays and replays still waiting to be sent by a live process.
    outstanding: int = 0


def _fault(fault_id: str, kind: str, line: Mapping[str, Any], ids: list[str]) -> Fault:
    return Fault(
        fault_id,
        kind,
        str(line["stream"]),
        str(line.get("workflow_id", "")),
        str(line.get("step", "")),
        str(line.get("key", "")),
        float(line["t"]),
        str(line.get("label", "")),
        str(line.get("stream_key", "")),
        tuple(ids),
    )


def parse_faults(
    lines: Iterable[Mapping[str, Any]], dead_pids: Iterable[int] = ()
) -> FaultLogSummary:
    """Turn log lines into faults. `dead_pids`: processes that are gone, so what they
    still held will never be sent."""
    dead = set(dead_pids)
    by_id: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        by_id[str(line["fault_id"])].append(line)
    out = FaultLogSummary([])
    for fault_id, group in by_id.items():
        phases = {str(g["phase"]): g for g in group}
        first = group[0]
        kind = str(first["kind"])
        # Every entry the message made: a duplicate's two copies; a replay's original
        # (from its `scheduled` line) and copy; a released delay's one copy.
        ids = [str(i) for g in group for i in g.get("entry_ids", [])]
        ids += [str(g[k]) for g in group for k in ("entry_id", "original_entry_id") if k in g]
        if kind == "delay":
            if "released" in phases:
                out.faults.append(_fault(fault_id, "delay", phases["released"], ids))
            elif "lost" in phases or int(first["pid"]) in dead:
                out.faults.append(_fault(fault_id, "delay_unreleased", phases["injected"], ids))
            else:
                out.outstanding += 1
        elif kind == "replay":
            if "injected" in phases:
                out.faults.append(_fault(fault_id, "replay", phases["injected"], ids))
            elif "lost" in phases or int(first["pid"]) in dead:
                out.replays_not_sent += 1
            else:
                out.outstanding += 1
        else:
            out.faults.append(_fault(fault_id, kind, first, ids))
    out.faults.sort(key=lambda f: f.t)
    return out


@dataclass
class MatchLine:
    """One row of the matching table: faults of one kind on one stream, and their rows."""

    kind: str
    stream: str
    #: What row answers this kind of fault.
    answered_by: str
    injected: int = 0
    matched: int = 0
    #: Matched in a special way, by why (e.g. "lost with Redis, declared dropped").
    notes: Counter[str] = field(default_factory=Counter)
    unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stream": self.stream,
            "answered_by": self.answered_by,
            "injected": self.injected,
            "matched": self.matched,
            "notes": dict(self.notes),
            "unmatched": self.unmatched[:MAX_PROBLEMS],
        }


@dataclass
class RowLine:
    """The other side: rows of one class, how many answered a fault, how many did not."""

    rows: str
    total: int
    used: int

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "total": self.total, "matched_to_faults": self.used}


@dataclass
class FaultMatching:
    lines: list[MatchLine]
    rows: list[RowLine]
    replays_not_sent: int = 0
    outstanding: int = 0

    @property
    def injected(self) -> int:
        return sum(m.injected for m in self.lines)

    @property
    def matched(self) -> int:
        return sum(m.matched for m in self.lines)

    @property
    def complete(self) -> bool:
        return self.matched == self.injected and self.outstanding == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "injected": self.injected,
            "matched": self.matched,
            "replays_not_sent": self.replays_not_sent,
            "outstanding": self.outstanding,
            "faults": [m.to_dict() for m in self.lines],
            "rows": [r.to_dict() for r in self.rows],
        }


_ANSWERS = {
    ("completion", "drop"): "event evidence `dropped` for its key",
    ("completion", "delay_unreleased"): "event evidence `dropped` for its key",
    ("completion", "duplicate"): "two arrivals for its key, one `duplicate`/`late`",
    ("completion", "replay"): "a further arrival for its key, `duplicate`/`late`",
    ("completion", "delay"): "an arrival for its key (`consumed`/`late`)",
    ("completion", "reorder"): "an arrival for its key",
    ("ready", "drop"): "recovery redispatch/streams_reset/pending_entry for (wf, step)",
    ("ready", "delay_unreleased"): "recovery redispatch/streams_reset/pending_entry",
    ("ready", "duplicate"): "delivery evidence duplicate/late/replayed for (wf, step)",
    ("ready", "replay"): "delivery evidence duplicate/late/replayed for (wf, step)",
    ("ready", "delay"): "a claim or delivery evidence for (wf, step) after release",
    ("ready", "reorder"): "a claim or delivery evidence for (wf, step) after the read",
}
_ORDER = ("drop", "delay_unreleased", "duplicate", "replay", "delay", "reorder")


def match_faults(
    summary: FaultLogSummary,
    snap: LedgerSnapshot,
    performs: Performs,
    lost_with_redis: Collection[tuple[str, str]] = (),
) -> FaultMatching:
    """Match every fault to the row(s) that make it visible, per kind and identity.

    Completion events (identity: the event's key):
      drop, or a delay never released  <-> `dropped` event evidence with that key
      duplicate                         <-> two arrivals, one of them duplicate/late
      replay                            <-> one arrival more per replay, duplicate/late
      delay (released), reorder         <-> an arrival (consumed, or late when the
                                            reconciler had declared it dropped first)
    Ready messages (identity: workflow id and step), counted per step since a step may
    be dispatched several times:
      drop, or a delay never released  <-> a redispatch/streams_reset/pending_entry
                                            recovery row for the step made after it
                                            (each row answers one loss), or, when an older
                                            message claimed the step first so nothing
                                            had to be sent again, the delivery row that
                                            records that stale claim
      duplicate, replay                 <-> a delivery evidence row for the step
      delay (released), reorder         <-> the step claimed (a perform started) or a
                                            delivery/recovery row, after the fault
    Redis killed: `lost_with_redis` holds the (stream key, entry id) of every entry Redis
    still held undelivered or unacknowledged the moment it was killed. A duplicate,
    replayed or delayed copy among them went down with Redis before anyone could see it;
    such a fault is accepted as lost with Redis and the table says so.
    """
    lost = set(lost_with_redis)
    lines: dict[tuple[str, str], MatchLine] = {}

    def line(f: Fault) -> MatchLine:
        k = (f.stream, f.kind)
        if k not in lines:
            lines[k] = MatchLine(f.kind, f.stream, _ANSWERS.get(k, "?"))
        return lines[k]

    def went_down_with_redis(f: Fault) -> bool:
        return any((f.stream_key, i) in lost for i in f.entry_ids)

    # -- completion events, per key ------------------------------------------------------
    events: dict[str, Counter[str]] = defaultdict(Counter)
    for e in snap.evidence:
        if e.kind == "event" and e.dedupe_key:
            events[e.dedupe_key][e.classification] += 1
    used_dropped = used_repeats = 0
    by_key: dict[str, list[Fault]] = defaultdict(list)
    for f in summary.faults:
        if f.stream == "completion":
            by_key[f.key].append(f)
    for key, faults in by_key.items():
        found = events.get(key, Counter())
        arrivals = sum(found[c] for c in EVENT_ARRIVALS)
        repeats = found["duplicate"] + found["late"]
        extra = sum(1 for f in faults if f.kind in ("duplicate", "replay"))
        for f in sorted(faults, key=lambda f: _ORDER.index(f.kind)):
            m = line(f)
            m.injected += 1
            if f.kind in ("drop", "delay_unreleased"):
                ok = found["dropped"] > 0
                used_dropped += ok
            elif f.kind in ("duplicate", "replay"):
                ok = arrivals >= 1 + extra and (repeats >= 1 or found["dead_letter"] >= 1)
                used_repeats += ok
            else:
                ok = arrivals >= 1
            if ok:
                m.matched += 1
            elif went_down_with_redis(f):
                m.matched += 1
                m.notes["still in Redis when it was killed"] += 1
            else:
                m.unmatched.append(
                    f"{f.fault_id} {key}: rows {dict(found) or 'none'} (at {f.t:.3f})"
                )

    # -- ready messages, per step ----------------------------------------------------------
    recs: dict[tuple[str, str], list[RecoveryRow]] = defaultdict(list)
    for r in snap.recoveries:
        if r.step is not None:
            recs[(r.workflow_id, r.step)].append(r)
    deliveries: dict[tuple[str, str], list[EvidenceRow]] = defaultdict(list)
    for e in snap.evidence:
        if e.kind == "delivery" and e.step is not None and e.classification in DELIVERY_REPEATS:
            deliveries[(e.workflow_id, e.step)].append(e)
    used_recs = used_deliveries = 0
    by_step: dict[tuple[str, str], list[Fault]] = defaultdict(list)
    for f in summary.faults:
        if f.stream == "ready":
            by_step[(f.workflow_id, f.step)].append(f)
    for k, faults in by_step.items():
        step_recs = [r for r in recs.get(k, []) if r.repair in READY_REPAIRS]
        step_dels = deliveries.get(k, [])
        free_dels = len(step_dels)
        leftovers: list[Fault] = []
        losses: list[Fault] = []
        # Rows go first to faults whose copies did not go down with Redis: those that did
        # are accounted for without a row.
        order = sorted(faults, key=lambda f: (went_down_with_redis(f), _ORDER.index(f.kind), f.t))
        for f in order:
            m = line(f)
            m.injected += 1
            if f.kind in ("drop", "delay_unreleased"):
                losses.append(f)
                continue
            elif f.kind in ("duplicate", "replay"):
                if free_dels:
                    free_dels -= 1
                    used_deliveries += 1
                    m.matched += 1
                    continue
            else:
                since = f.t - TOLERANCE_S
                seen = (
                    performs.started_since(k[0], k[1], f.t)
                    or any(r.created_at >= since for r in step_recs)
                    or any(e.created_at >= since for e in step_dels)
                )
                if seen:
                    m.matched += 1
                    continue
            leftovers.append(f)
        # A lost message is answered by a row made after it: the step sent again (a
        # recovery), or a stale copy that claimed it first, so nobody had to (the stale
        # claim's delivery row, which also answers that copy's own fault). The latest
        # loss takes the earliest row after it, and so on back: this pairs every loss
        # that any pairing could (assigned in time order by count, a recovery made for
        # the second of two losses once went to the first, and the second had no row).
        answers = sorted(
            [(r.created_at, False) for r in step_recs]
            + [(e.created_at, True) for e in step_dels if e.reason == STALE_CLAIM]
        )
        for f in sorted(losses, key=lambda f: (went_down_with_redis(f), -f.t)):
            m = line(f)
            answer = next((a for a in answers if a[0] >= f.t - TOLERANCE_S), None)
            if answer is None:
                leftovers.append(f)
                continue
            answers.remove(answer)
            m.matched += 1
            if answer[1]:
                m.notes["overtaken by a stale message that claimed the step (on record)"] += 1
            else:
                used_recs += 1
        for f in leftovers:
            m = line(f)
            if went_down_with_redis(f):
                m.matched += 1
                m.notes["still in Redis when it was killed"] += 1
            else:
                hint = ""
                if performs.started_since(k[0], k[1], f.t):
                    # What the known stale-ready gap looks like (docs/chaos.md).
                    hint = "; the step was claimed after it, and no row says by what"
                m.unmatched.append(
                    f"{f.fault_id} {k[0]} {k[1]} (at {f.t:.3f}): "
                    f"{len(step_recs)} ready recoveries, {len(step_dels)} delivery rows "
                    f"for {len(faults)} faults on this step{hint}"
                )

    ordered = sorted(lines.values(), key=lambda m: (m.stream != "completion", _ORDER.index(m.kind)))
    evidence_counts = snap.evidence_counts()
    repair_counts = snap.repair_counts()
    rows = [
        RowLine("event/dropped", evidence_counts["event/dropped"], used_dropped),
        RowLine(
            "event/duplicate+late",
            evidence_counts["event/duplicate"] + evidence_counts["event/late"],
            used_repeats,
        ),
        RowLine(
            "recovery redispatch+streams_reset+pending_entry",
            sum(repair_counts[r] for r in READY_REPAIRS),
            used_recs,
        ),
        RowLine(
            "delivery/duplicate+late+replayed+dead_letter",
            sum(evidence_counts[f"delivery/{c}"] for c in DELIVERY_REPEATS),
            used_deliveries,
        ),
    ]
    return FaultMatching(ordered, rows, summary.replays_not_sent, summary.outstanding)


def check_faults_visible(matching: FaultMatching) -> InvariantResult:
    problems: list[str] = []
    for m in matching.lines:
        for u in m.unmatched:
            problems.append(f"{m.stream} {m.kind} unmatched: {u}")
    if matching.outstanding:
        problems.append(f"{matching.outstanding} delayed/replayed messages never sent")
    return _result(
        "faults_visible",
        "every injected fault is visible as evidence or a recovery row",
        f"{matching.injected} faults injected, {matching.matched} matched",
        problems,
    )
