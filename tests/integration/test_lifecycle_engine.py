"""Cancel, callbacks and signals end to end: real worker and consumer processes on real
PostgreSQL and Redis (the same harness as test_engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import Workflow
from tests import engine_app as app
from tests.integration.processes import ROOT, wait_for
from tests.integration.test_engine import Cluster, ctx, finished

pytestmark = pytest.mark.postgres


@pytest.fixture
def cluster(
    pg_engine: Engine, postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    c = Cluster(postgres_url, redis_url, tmp_path)
    yield c
    c.close()


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamflow", *args],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(cluster: Cluster, **match: Any) -> list[dict[str, Any]]:
    return [r for r in app.perform_log(cluster.log) if all(r.get(k) == v for k, v in match.items())]


def test_cancel_revokes_a_running_step_and_its_late_completion_changes_nothing(
    pg_engine: Engine, cluster: Cluster
) -> None:
    wf = (
        Workflow.new("cancel_e2e", ctx(cluster))
        .add("long", app.WaitsForCancel.new({"seconds": 60}))
        .add("after", app.Echo.new(), deps=["long"])
    )
    cluster.consumer()
    worker = cluster.worker("w1", "--lease-seconds", "3")
    wid = Workflow.insert(wf, pg_engine).id
    wait_for(
        lambda: lines(cluster, step="long", phase="start"),
        20,
        "the long step to start",
        on_timeout=cluster.outputs,
    )
    done = cli(cluster, "cancel", wid, "--reason", "customer withdrew", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["effect"], result["revoked"], result["workflow_outcome"]) == (
        "applied",
        ["long"],
        "cancelled",
    )
    assert result["cancelled"] == ["long", "after"]
    cancelled_at = time.time()

    def late_report() -> list[Any]:
        e = t.evidence
        with pg_engine.connect() as conn:
            return list(
                conn.execute(
                    select(e.c.classification, e.c.reason, e.c.payload, e.c.source).where(
                        e.c.workflow_id == wid, e.c.kind == "completion"
                    )
                ).all()
            )

    [row] = wait_for(late_report, 20, "the worker's late report", on_timeout=cluster.outputs)
    assert (row.classification, row.reason, row.source) == ("late", "step_cancelled", "worker")
    assert row.payload == {"noticed_cancel": True}
    [end] = lines(cluster, step="long", phase="end")
    # The worker noticed at its next renewal: within one heartbeat (lease / 3 = 1 s).
    assert end["noticed_cancel"] is True and end["at"] - cancelled_at < 3
    record = Workflow.get(pg_engine, wid)
    assert record.outcome == "cancelled"
    assert {n: s.state.value for n, s in record.steps.items()} == {
        "long": "cancelled",
        "after": "cancelled",
    }
    assert Workflow.results(pg_engine, wid) == {}
    assert not lines(cluster, step="after")
    # A repeated request is recorded too, and changes nothing.
    again = cli(cluster, "cancel", wid)
    assert again.returncode == 0 and "already cancelled" in again.stdout
    assert [r.effect for r in Workflow.cancel_requests(pg_engine, wid)] == [
        "applied",
        "repeated",
    ]
    assert worker.terminate(timeout=30) == 0


def test_cancel_of_an_unknown_workflow_is_one_line_and_exit_code_2(cluster: Cluster) -> None:
    bad = cli(cluster, "cancel", "f" * 32)
    assert bad.returncode == 2
    assert "no workflow with id" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_callback_runs_exactly_once_even_when_its_ready_message_is_replayed(
    pg_engine: Engine, cluster: Cluster
) -> None:
    wfs = [
        Workflow.new(f"callback_{i}", ctx(cluster), on_finish=app.Notify.new({"to": f"t{i}"}))
        .add("a", app.Echo.new())
        .add("b", app.Echo.new(), deps=["a"])
        for i in range(5)
    ]
    cluster.consumer()
    cluster.worker("w1")
    cluster.worker("w2")
    wids = [Workflow.insert(wf, pg_engine).id for wf in wfs]

    def callbacks_done() -> bool:
        return all(
            (cb := Workflow.callback(pg_engine, w)) is not None and cb.state == "completed"
            for w in wids
        )

    wait_for(callbacks_done, 30, "every callback to complete", on_timeout=cluster.outputs)
    stream = cluster.keys.ready("default")
    replayed = 0
    for _id, fields in cluster.redis.xrange(stream):
        if fields.get("job") == "callback":
            for _ in range(3):
                cluster.redis.xadd(stream, fields)
                replayed += 1
    assert replayed == 3 * len(wids)

    def refused() -> int:
        e = t.evidence
        with pg_engine.connect() as conn:
            return len(
                conn.execute(
                    select(e.c.id).where(
                        e.c.kind == "callback", e.c.classification.in_(("duplicate", "late"))
                    )
                ).all()
            )

    wait_for(lambda: refused() >= replayed, 20, "the replays refused", on_timeout=cluster.outputs)
    runs = lines(cluster, phase="callback")
    assert sorted(r["wf"] for r in runs) == sorted(wids)
    for wid, i in zip(wids, range(5), strict=True):
        cb = Workflow.callback(pg_engine, wid)
        assert cb is not None
        assert cb.result == {"notified": "completed", "to": f"t{i}"}
        assert [(a.attempt, a.status) for a in cb.attempts] == [(1, "completed")]
        assert cb.counters["completed"] == 2


def test_a_signal_sent_with_the_cli_releases_a_waiting_step_in_the_engine(
    pg_engine: Engine, cluster: Cluster
) -> None:
    wf = (
        Workflow.new("signal_e2e", ctx(cluster))
        .add("prepare", app.Echo.new())
        .add(
            "approve",
            app.EchoSignal.new(),
            deps=["prepare"],
            await_signal="manager_approval",
            signal_deadline=timedelta(hours=4),
        )
        .add("ship", app.Echo.new(), deps=["approve"])
    )
    cluster.consumer()
    cluster.worker()
    wid = Workflow.insert(wf, pg_engine).id

    def waiting() -> bool:
        steps = Workflow.get(pg_engine, wid).steps
        return steps["prepare"].state.value == "completed" and steps["approve"].await_state == (
            "waiting"
        )

    wait_for(waiting, 20, "the await to become active", on_timeout=cluster.outputs)
    status = cli(cluster, "explain", wid, "approve", "--json")
    assert json.loads(status.stdout)["blocker_codes"] == ["awaiting_signal"]

    bad = cli(cluster, "signal", wid, "manager_approval", "--payload", "{not json")
    assert bad.returncode == 2 and "--payload is not valid JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = cli(cluster, "signal", "f" * 32, "manager_approval")
    assert unknown.returncode == 2 and "no workflow with id" in unknown.stderr

    payload = '{"approved": true, "by": "ann"}'
    sent = cli(
        cluster,
        "signal",
        wid,
        "manager_approval",
        "--payload",
        payload,
        "--dedupe-key",
        "a-1",
        "--json",
    )
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["classification"] == "consumed"
    finished(pg_engine, cluster, wid)
    assert Workflow.get(pg_engine, wid).outcome == "completed"
    [run] = lines(cluster, step="approve", phase="signalled")
    assert run["signal"] == {"approved": True, "by": "ann"}
    assert Workflow.results(pg_engine, wid)["approve"] == {
        "signal": {"approved": True, "by": "ann"}
    }
    again = cli(
        cluster, "signal", wid, "manager_approval", "--payload", payload, "--dedupe-key", "a-1"
    )
    assert again.returncode == 0 and "duplicate" in again.stdout
    assert [s.classification for s in Workflow.signals(pg_engine, wid)] == [
        "consumed",
        "duplicate",
    ]
