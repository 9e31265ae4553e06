"""The chaos suite's fault matching: each injected fault paired with a row that shows it."""

from __future__ import annotations

from chaos.invariants import (
    STALE_CLAIM,
    EvidenceRow,
    Fault,
    FaultLogSummary,
    LedgerSnapshot,
    Performs,
    RecoveryRow,
    match_faults,
)

WF, STEP = "wf-1", "flaky"


def _ready(fault_id: str, kind: str, t: float) -> Fault:
    return Fault(fault_id, kind, "ready", WF, STEP, "", t, "consumer")


def test_a_recovery_answers_only_a_drop_made_before_it() -> None:
    """Seed 11 once failed on this, with nothing missing from the ledger: the retry's
    ready message was dropped at 5.4 and a replayed older copy claimed the step at 7.0
    (a stale claim, on record); the next retry's message was dropped at 8.7 and the
    reconciler dispatched it again at 10.7 (a recovery). Assigned by count in time
    order, the recovery went to the first drop and left the second without a row; each
    row must answer a drop made before it."""
    faults = [
        _ready("drop-1", "drop", 5.355),
        _ready("replay", "replay", 7.030),
        _ready("drop-2", "drop", 8.741),
    ]
    snap = LedgerSnapshot(
        evidence=[EvidenceRow("delivery", "replayed", WF, STEP, None, 7.033, STALE_CLAIM)],
        recoveries=[RecoveryRow("redispatch", WF, STEP, 10.7)],
    )
    performs = Performs.of(
        {"wf": WF, "step": STEP, "attempt": n, "phase": "start", "t": t}
        for n, t in ((1, 4.4), (2, 7.033), (3, 10.935))
    )
    matching = match_faults(FaultLogSummary(faults), snap, performs)
    assert [(m.kind, m.injected, m.matched, m.unmatched) for m in matching.lines] == [
        ("drop", 2, 2, []),
        ("replay", 1, 1, []),
    ]
    [drops] = [m for m in matching.lines if m.kind == "drop"]
    assert drops.notes == {"overtaken by a stale message that claimed the step (on record)": 1}


def test_a_drop_after_every_row_stays_unmatched() -> None:
    """The other way round: a recovery made before a drop cannot be what answered it."""
    faults = [_ready("drop-1", "drop", 9.0)]
    snap = LedgerSnapshot(recoveries=[RecoveryRow("redispatch", WF, STEP, 5.0)])
    performs = Performs.of([{"wf": WF, "step": STEP, "attempt": 1, "phase": "start", "t": 9.5}])
    matching = match_faults(FaultLogSummary(faults), snap, performs)
    [drops] = matching.lines
    assert drops.matched == 0 and len(drops.unmatched) == 1
    assert "the step was claimed after it" in drops.unmatched[0]
