"""The reconciler's pass: each kind of loss repaired once, with a recovery row, and
nothing at all when nothing is wrong — on both backends."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from ledger import tables as t
from ledger.claims import claim_step
from ledger.consume import CompletionEventView, consume_completions
from ledger.db import transaction
from ledger.reconcile import child_is_owed, find_unapplied_releases, resume_point
from ledger.rules import (
    TERMINAL_STATES,
    AwaitState,
    DependencyView,
    EdgePolicy,
    StepState,
    decide_child,
)
from ledger.transitions import complete_step
from streamflow import Dep, Workflow
from streamflow.reconciler import Reconciler, ReconcilerConfig
from streamflow.streams.keys import StreamKeys
from tests.ledger.helpers import evidence, recount, states
from tests.workers import Noop

LONG_AGO = datetime.now(UTC) - timedelta(minutes=10)


def reconciler(engine: Engine, **config: Any) -> Reconciler:
    return Reconciler(engine, None, StreamKeys(), ReconcilerConfig(**config), host="test")


def chain() -> Workflow:
    return Workflow.new("w").add("a", Noop.new()).add("b", Noop.new(), deps=["a"])


def repairs(engine: Engine) -> list[tuple[str | None, str, int | None]]:
    r = t.recoveries
    with engine.connect() as conn:
        return [
            (x.step, x.repair, x.pass_id)
            for x in conn.execute(select(r.c.step, r.c.repair, r.c.pass_id).order_by(r.c.id))
        ]


def test_a_pass_with_nothing_to_repair_repairs_nothing(engine: Engine) -> None:
    Workflow.insert(chain(), engine)
    summary = reconciler(engine).run_pass()
    assert summary.repairs == {} and summary.total == 0
    with engine.connect() as conn:
        row = conn.execute(select(t.reconciler_passes)).mappings().one()
    assert row["finished_at"] is not None and row["summary"]["repairs"] == {}
    assert repairs(engine) == []


def test_an_unapplied_release_is_applied_once(engine: Engine) -> None:
    wid = Workflow.insert(chain(), engine).id
    with engine.begin() as conn:  # a completion whose release was lost
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == "a")
            .values(state="completed", attempt=1, finished_at=datetime.now(UTC))
        )
        conn.execute(
            update(t.workflows)
            .where(t.workflows.c.id == wid)
            .values(available_count=0, completed_count=1)
        )
    summary = reconciler(engine).run_pass()
    assert summary.repairs.get("release") == 1
    assert states(engine, wid) == {"a": "completed", "b": "available"}
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)
    assert repairs(engine) == [("b", "release", summary.pass_id)]
    assert reconciler(engine).run_pass().total == 0


def fan_in(*parents: str | Dep, awaits: bool = False) -> Workflow:
    """Parents `a`, `b`, ... and a `join` after all of them (awaiting signal `go`)."""
    wf = Workflow.new("fan")
    for parent in parents:
        wf = wf.add(parent.step if isinstance(parent, Dep) else parent, Noop.new())
    return wf.add("join", Noop.new(), deps=list(parents), await_signal="go" if awaits else None)


def finish_unapplied(engine: Engine, wid: str, step: str, state: str) -> None:
    """`step` ends in `state`, as a recorded outcome whose release or cascade was lost."""
    with engine.begin() as conn:
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == step)
            .values(state=state, attempt=1, finished_at=datetime.now(UTC))
        )


def release_candidates(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return sorted(find_unapplied_releases(conn, LONG_AGO, 100))


def test_a_join_still_waiting_on_a_parent_is_no_candidate(engine: Engine) -> None:
    """A finished parent whose child waits on another, unfinished parent owes nothing:
    under a fan-in every finished parent is such a pair until the last one ends, and
    each pass used to take every one of those workflows' locks to find that out."""
    wid = Workflow.insert(fan_in("a", "b", "c"), engine).id
    finish_unapplied(engine, wid, "a", "completed")
    finish_unapplied(engine, wid, "b", "completed")
    assert release_candidates(engine) == []
    assert reconciler(engine).run_pass().total == 0


def test_a_parent_that_cancels_its_child_is_a_candidate_while_another_runs(
    engine: Engine,
) -> None:
    wid = Workflow.insert(fan_in("a", "b"), engine).id
    finish_unapplied(engine, wid, "a", "failed")  # b is still available
    assert release_candidates(engine) == [(wid, "a")]
    summary = reconciler(engine).run_pass()
    assert summary.repairs.get("release") == 1
    assert states(engine, wid)["join"] == "cancelled"


def test_a_continue_edge_waits_like_any_other_until_every_parent_ends(engine: Engine) -> None:
    wid = Workflow.insert(fan_in(Dep("a", "continue"), "b"), engine).id
    finish_unapplied(engine, wid, "a", "failed")
    assert release_candidates(engine) == []
    finish_unapplied(engine, wid, "b", "completed")
    assert release_candidates(engine) == [(wid, "a"), (wid, "b")]
    assert reconciler(engine).run_pass().repairs.get("release") == 1
    assert states(engine, wid)["join"] == "available"


def test_an_owed_release_is_found_whatever_waits_in_fan_ins(engine: Engine) -> None:
    """A pass takes `batch` candidates and looks only at steps finished since the last
    pass: finished parents waiting in fan-ins used to fill the batch, and a release owed
    behind them (a later workflow id) was never looked at again."""
    for _ in range(3):
        wid = Workflow.insert(fan_in("a", "b", "c"), engine).id
        finish_unapplied(engine, wid, "a", "completed")
        finish_unapplied(engine, wid, "b", "completed")
    lost = Workflow.insert(chain(), engine).id
    finish_unapplied(engine, lost, "a", "completed")
    summary = reconciler(engine, batch=2).run_pass()
    assert summary.repairs.get("release") == 1
    assert states(engine, lost) == {"a": "completed", "b": "available"}


def test_a_pass_that_filled_its_batch_leaves_the_rest_to_the_next_one(engine: Engine) -> None:
    """Each pass looks at what finished since the previous pass started. A pass that
    found more than `batch` to repair must not move that point on, or what it left
    behind falls out of every later window (here with no overlap to hide it)."""
    lost = []
    for _ in range(5):
        wid = Workflow.insert(chain(), engine).id
        finish_unapplied(engine, wid, "a", "completed")
        lost.append(wid)
    rec = reconciler(engine, batch=2, overlap=timedelta(0))
    passes = [rec.run_pass() for _ in range(4)]
    assert [p.repairs.get("release", 0) for p in passes] == [2, 2, 1, 0]
    # A pass says it left work behind (the CLI and its log line show it).
    assert [p.more_to_repair for p in passes] == [True, True, False, False]
    assert passes[0].as_dict()["more_to_repair"] is True
    assert all(states(engine, wid)["b"] == "available" for wid in lost)
    # Once a pass found less than a batch, the next looks only from its start again.
    with engine.connect() as conn:
        latest = conn.execute(select(func.max(t.reconciler_passes.c.started_at))).scalar_one()
        assert resume_point(conn) == latest


def awaiting_join(engine: Engine, await_state: str) -> str:
    """`a` finished (its release lost) and `b` awaits signal `go` after it, its await
    in `await_state`."""
    wf = Workflow.new("w").add("a", Noop.new()).add("b", Noop.new(), deps=["a"], await_signal="go")
    wid = Workflow.insert(wf, engine).id
    finish_unapplied(engine, wid, "a", "completed")
    with engine.begin() as conn:
        conn.execute(
            update(t.awaits)
            .where(t.awaits.c.workflow_id == wid, t.awaits.c.step == "b")
            .values(state=await_state)
        )
    return wid


def test_a_child_whose_await_is_active_is_no_candidate(engine: Engine) -> None:
    """Its dependencies are met and it waits for its signal, perhaps for days: nothing is
    owed. As a candidate it would come back every pass, and enough of them would fill
    every batch and hold the window where it is."""
    awaiting_join(engine, "waiting")
    assert release_candidates(engine) == []


def test_a_child_whose_await_was_never_activated_is_a_candidate(engine: Engine) -> None:
    wid = awaiting_join(engine, "pending")
    assert release_candidates(engine) == [(wid, "a")]
    assert reconciler(engine).run_pass().repairs.get("release") == 1
    with engine.connect() as conn:
        state = conn.execute(
            select(t.awaits.c.state).where(t.awaits.c.workflow_id == wid)
        ).scalar_one()
    assert state == "waiting"
    assert release_candidates(engine) == []


def test_the_candidates_are_the_children_the_rules_say_are_owed(engine: Engine) -> None:
    """Every combination of two parents' edge policies and states and the child's await
    (none, not yet active, active), against `decide_child` and the repair's `child_is_owed`: a
    finished parent is a candidate exactly when its pending child is owed a change."""
    combos = itertools.product(
        itertools.product(EdgePolicy, StepState),
        itertools.product(EdgePolicy, StepState),
        (None, AwaitState.PENDING, AwaitState.WAITING),
    )
    expected: set[tuple[str, str]] = set()
    for (pa, sa), (pb, sb), await_state in combos:
        wf = fan_in(Dep("a", pa.value), Dep("b", pb.value), awaits=await_state is not None)
        wid = Workflow.insert(wf, engine).id
        with engine.begin() as conn:
            for step, state in (("a", sa), ("b", sb)):
                finished = datetime.now(UTC) if state in TERMINAL_STATES else None
                conn.execute(
                    update(t.steps)
                    .where(t.steps.c.workflow_id == wid, t.steps.c.name == step)
                    .values(state=state.value, finished_at=finished)
                )
            if await_state is not None:
                conn.execute(
                    update(t.awaits)
                    .where(t.awaits.c.workflow_id == wid)
                    .values(state=await_state.value)
                )
        deps = [DependencyView("a", sa, pa), DependencyView("b", sb, pb)]
        decision = decide_child(deps, awaiting_signal=await_state is not None)
        if child_is_owed(decision.kind, await_state):
            expected |= {
                (wid, step) for step, st in (("a", sa), ("b", sb)) if st in TERMINAL_STATES
            }
    with engine.connect() as conn:
        found = set(find_unapplied_releases(conn, LONG_AGO, 10_000))
    assert found == expected
    assert expected  # the combinations include children owed a change


def worker_outcome(engine: Engine, wid: str, step: str, at: datetime) -> None:
    with transaction(engine) as conn:
        claim_step(conn, wid, step, owner="w", lease_seconds=60, now=at)
        complete_step(conn, wid, step, "completed", 1, attempt=1, source="worker", now=at)


def test_a_completion_event_never_consumed_is_declared_dropped(engine: Engine) -> None:
    wid = Workflow.insert(chain(), engine).id
    worker_outcome(engine, wid, "a", LONG_AGO)
    summary = reconciler(engine, first_lookback=timedelta(hours=1)).run_pass()
    assert summary.repairs == {"dropped_event": 1}
    assert [e["classification"] for e in evidence(engine, wid)] == ["dropped"]
    # The event turns up after all: it is late, and changes nothing.
    with transaction(engine) as conn:
        [late] = consume_completions(
            conn,
            [CompletionEventView(wid, "a", "completed", 1, f"{wid}:a:1:completed")],
            datetime.now(UTC),
            "consumer",
        )
    assert late.classification == "late"
    assert reconciler(engine, first_lookback=timedelta(hours=1)).run_pass().total == 0


def test_a_consumed_or_recent_event_is_not_dropped(engine: Engine) -> None:
    wid = Workflow.insert(chain(), engine).id
    worker_outcome(engine, wid, "a", LONG_AGO)
    with transaction(engine) as conn:
        consume_completions(
            conn,
            [CompletionEventView(wid, "a", "completed", 1, f"{wid}:a:1:completed")],
            datetime.now(UTC),
            "consumer",
        )
    other = Workflow.insert(chain(), engine).id
    worker_outcome(engine, other, "a", datetime.now(UTC))  # within the grace period
    assert reconciler(engine, first_lookback=timedelta(hours=1)).run_pass().total == 0


def test_expired_leases_overdue_retries_and_stale_dispatches(engine: Engine) -> None:
    leased = Workflow.insert(chain(), engine).id
    with transaction(engine) as conn:
        claim_step(conn, leased, "a", owner="dead", lease_seconds=1, now=LONG_AGO)
    retry = Workflow.insert(chain(), engine).id
    with transaction(engine) as conn:
        complete_step(
            conn,
            retry,
            "a",
            "retryable",
            {"e": 1},
            now=LONG_AGO,
            retry_at=LONG_AGO + timedelta(seconds=1),
        )
    stale = Workflow.insert(chain(), engine).id
    with engine.begin() as conn:
        conn.execute(
            update(t.steps).where(t.steps.c.workflow_id == stale).values(dispatched_at=LONG_AGO)
        )
    summary = reconciler(engine).run_pass()
    assert summary.repairs == {"lease_expired": 1, "retry_due": 1, "redispatch": 1}
    # The expired lease was recorded as a retry due now; the next pass is quiet except
    # for taking that retry up if the dispatcher has not (it has not: no streams here).
    assert states(engine, leased)["a"] in ("retryable", "available")
    assert {(s, r) for s, r, _ in repairs(engine)} == {
        ("a", "lease_expired"),
        ("a", "retry_due"),
        ("a", "redispatch"),
    }


@pytest.mark.postgres
def test_two_reconcilers_at_once_apply_each_repair_once(pg_engine: Engine) -> None:
    broken = []
    for _ in range(40):
        wid = Workflow.insert(chain(), pg_engine).id
        worker_outcome(pg_engine, wid, "a", LONG_AGO)
        broken.append(wid)
    with pg_engine.begin() as conn:  # lose every release, so both kinds of repair are owed
        conn.execute(update(t.steps).where(t.steps.c.name == "b").values(state="pending"))
        conn.execute(update(t.workflows).values(available_count=0, pending_count=1))
    barrier = threading.Barrier(2, timeout=10)
    results = []

    def one(host: str) -> None:
        r = Reconciler(
            pg_engine,
            None,
            StreamKeys(),
            ReconcilerConfig(first_lookback=timedelta(hours=1)),
            host=host,
        )
        barrier.wait()
        results.append(r.run_pass())

    threads = [threading.Thread(target=one, args=(h,)) for h in ("host-a", "host-b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 2
    with pg_engine.connect() as conn:
        per_step = conn.execute(
            select(t.recoveries.c.workflow_id, t.recoveries.c.repair, func.count()).group_by(
                t.recoveries.c.workflow_id, t.recoveries.c.repair
            )
        ).all()
        dropped = conn.execute(
            select(func.count())
            .select_from(t.evidence)
            .where(t.evidence.c.classification == "dropped")
        ).scalar_one()
    assert all(n == 1 for _, _, n in per_step)
    assert dropped == 40
    for wid in broken:
        assert states(pg_engine, wid) == {"a": "completed", "b": "available"}
        assert Workflow.get(pg_engine, wid).counters.as_dict() == recount(pg_engine, wid)


def test_without_streams_nothing_is_marked_dispatched(engine: Engine) -> None:
    # A reconciler that cannot publish must leave (or put) steps back for the dispatcher,
    # never mark them sent.
    fresh = Workflow.insert(chain(), engine).id
    stale = Workflow.insert(chain(), engine).id
    with engine.begin() as conn:
        conn.execute(
            update(t.steps).where(t.steps.c.workflow_id == stale).values(dispatched_at=LONG_AGO)
        )
    assert reconciler(engine).run_pass().repairs == {"redispatch": 1}
    with engine.connect() as conn:
        marks = dict(
            conn.execute(
                select(t.steps.c.workflow_id, t.steps.c.dispatched_at).where(t.steps.c.name == "a")
            ).all()
        )
    assert marks == {fresh: None, stale: None}
