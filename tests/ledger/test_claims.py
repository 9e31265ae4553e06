"""Claims, leases and releases: a step runs at most once per attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from ledger import tables as t
from ledger.claims import Claim, ClaimRefused, claim_step, release_claim, renew_lease
from ledger.db import transaction
from ledger.operations import complete
from ledger.rules import ClaimVerdict, Classification
from streamflow import StepNotFoundError, Workflow
from tests.ledger.helpers import evidence, recount, states
from tests.workers import Noop

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def claim(engine: Engine, wid: str, step: str, owner: str = "w1") -> Claim | ClaimRefused:
    with transaction(engine) as conn:
        return claim_step(conn, wid, step, owner=owner, lease_seconds=30, now=NOW)


def two_steps() -> Workflow:
    return (
        Workflow.new("w", workflow_context={"tenant": 7})
        .add("a", Noop.new({"n": 1}))
        .add("b", Noop.new({"from_a": Workflow.result("a")}), deps=["a"])
    )


def test_claim_moves_available_to_executing_with_a_lease(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    c = claim(engine, wid, "a")
    assert isinstance(c, Claim)
    assert (c.attempt, c.args, c.workflow_context) == (1, {"n": 1}, {"tenant": 7})
    assert (c.lease_owner, c.lease_expires_at) == ("w1", NOW + timedelta(seconds=30))
    assert states(engine, wid)["a"] == "executing"
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)


def test_a_second_delivery_is_a_duplicate_and_runs_nothing(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    assert isinstance(claim(engine, wid, "a", "w1"), Claim)
    again = claim(engine, wid, "a", "w2")
    assert isinstance(again, ClaimRefused) and again.verdict is ClaimVerdict.DUPLICATE
    assert Workflow.get(engine, wid).steps["a"].attempt == 1
    assert evidence(engine, wid)[-1]["classification"] == "duplicate"


def test_claim_resolves_placeholders_from_stored_results(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    c = claim(engine, wid, "a")
    assert isinstance(c, Claim)
    complete(engine, wid, "a", "completed", {"customer": 1}, attempt=c.attempt)
    b = claim(engine, wid, "b")
    assert isinstance(b, Claim)
    assert b.args == {"from_a": {"customer": 1}}
    assert b.dependency_results == {"a": {"customer": 1}}


@pytest.mark.parametrize(
    ("setup", "verdict", "kind"),
    [
        ("pending", ClaimVerdict.NOT_READY, "replayed"),
        ("completed", ClaimVerdict.LATE, "late"),
    ],
)
def test_messages_for_steps_that_cannot_run_are_evidence(
    engine: Engine, setup: str, verdict: ClaimVerdict, kind: str
) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    step = "b"
    if setup == "completed":
        step = "a"
        complete(engine, wid, "a", "completed", 1)
    refused = claim(engine, wid, step)
    assert isinstance(refused, ClaimRefused) and refused.verdict is verdict
    assert evidence(engine, wid)[-1]["classification"] == kind


def test_outcome_with_the_claimed_attempt_applies(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    c = claim(engine, wid, "a")
    assert isinstance(c, Claim)
    r = complete(engine, wid, "a", "retryable", {"e": 1}, attempt=c.attempt, source="worker")
    assert (r.classification, r.attempt) == (Classification.APPLIED, 1)


def test_renew_only_while_the_lease_is_held(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    c = claim(engine, wid, "a")
    assert isinstance(c, Claim)
    with transaction(engine) as conn:
        assert renew_lease(conn, wid, "a", owner="w1", attempt=1, lease_seconds=60, now=NOW)
        assert not renew_lease(conn, wid, "a", owner="w2", attempt=1, lease_seconds=60, now=NOW)
        assert not renew_lease(conn, wid, "a", owner="w1", attempt=2, lease_seconds=60, now=NOW)


def test_release_hands_the_step_back_and_a_late_outcome_changes_nothing(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    c = claim(engine, wid, "a")
    assert isinstance(c, Claim)
    with transaction(engine) as conn:
        assert release_claim(conn, wid, "a", owner="w1", attempt=1, now=NOW)
        assert not release_claim(conn, wid, "a", owner="w1", attempt=1, now=NOW)
    assert states(engine, wid)["a"] == "available"
    assert Workflow.get(engine, wid).counters.as_dict() == recount(engine, wid)
    late = complete(engine, wid, "a", "completed", 1, attempt=1, source="worker")
    assert late.classification is Classification.LATE
    second = claim(engine, wid, "a", "w2")
    assert isinstance(second, Claim) and second.attempt == 2


def test_claiming_an_unknown_step_raises(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    with pytest.raises(StepNotFoundError):
        claim(engine, wid, "zzz")


def test_a_stale_ready_message_that_claims_is_kept_as_evidence(engine: Engine) -> None:
    # Found by the chaos suite: a ready message from an earlier dispatch (delayed or
    # replayed) that arrives when its step is available again claims it — correctly, the
    # step must run — but used to leave no trace of the stale message.
    wid = Workflow.insert(two_steps(), engine).id
    first_dispatch = NOW - timedelta(seconds=60)
    complete(engine, wid, "a", "retryable", {"e": 1}, now=first_dispatch, retry_at=first_dispatch)
    with engine.begin() as conn:  # the retry was promoted and dispatched again just now
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid, t.steps.c.name == "a")
            .values(state="available", available_at=NOW, dispatched_at=NOW, scheduled_at=None)
        )
        conn.execute(
            update(t.workflows)
            .where(t.workflows.c.id == wid)
            .values(retryable_count=0, available_count=1)
        )
    with transaction(engine) as conn:
        c = claim_step(
            conn, wid, "a", owner="w1", lease_seconds=30, now=NOW, message_at=first_dispatch
        )
    assert isinstance(c, Claim) and c.attempt == 2
    assert evidence(engine, wid)[-1] == {
        "step": "a",
        "classification": "replayed",
        "status": None,
        "reason": "stale_message_claimed",
    }


def test_a_current_ready_message_leaves_no_evidence(engine: Engine) -> None:
    wid = Workflow.insert(two_steps(), engine).id
    with engine.begin() as conn:
        conn.execute(
            update(t.steps)
            .where(t.steps.c.workflow_id == wid)
            .values(available_at=NOW, dispatched_at=NOW)
        )
    with transaction(engine) as conn:
        c = claim_step(
            conn,
            wid,
            "a",
            owner="w1",
            lease_seconds=30,
            now=NOW + timedelta(seconds=1),
            message_at=NOW,
        )
    assert isinstance(c, Claim)
    assert evidence(engine, wid) == []


def test_a_claim_is_the_lock_and_one_statement_on_postgres(pg_engine: Engine) -> None:
    from sqlalchemy import event as sa_event

    wid = Workflow.insert(two_steps(), pg_engine).id
    sent: list[str] = []
    with transaction(pg_engine) as conn:
        sa_event.listen(conn, "before_cursor_execute", lambda *a: sent.append(a[2]))
        c = claim_step(conn, wid, "a", owner="w1", lease_seconds=30, now=NOW)
    assert isinstance(c, Claim) and c.args == {"n": 1}
    assert len(sent) == 2, "\n".join(sent)
