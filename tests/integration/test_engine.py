"""The engine end to end: real worker and consumer processes on real PostgreSQL and Redis.

Each test gets a fresh ledger (the `pg_engine` fixture truncates it) and its own stream
key prefix. Steps log every `perform` to a file (tests/engine_app.py), so "ran at most
once per attempt" is counted across processes, not assumed.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow import Dep, Workflow
from streamflow.streams.codec import decode_ready
from streamflow.streams.keys import StreamKeys
from tests import engine_app as app
from tests.integration.processes import Proc, base_env, wait_for

pytestmark = pytest.mark.postgres


class Cluster:
    """The processes of one test, sharing a ledger, a Redis and a key prefix."""

    def __init__(self, postgres_url: str, redis_url: str, tmp: Path) -> None:
        self.prefix = f"sftest{uuid.uuid4().hex[:8]}"
        self.keys = StreamKeys(prefix=self.prefix)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.tmp = tmp
        self.env = base_env(
            STREAMFLOW_DATABASE_URL=postgres_url,
            STREAMFLOW_REDIS_URL=redis_url,
            STREAMFLOW_STREAM_PREFIX=self.prefix,
        )
        self.procs: list[Proc] = []
        self.log = tmp / "performs.jsonl"

    def start(self, *args: str, name: str) -> Proc:
        p = Proc(list(args), self.env, self.tmp, name)
        self.procs.append(p)
        return p

    def worker(self, name: str = "worker", *extra: str) -> Proc:
        return self.start(
            "worker",
            "--app",
            "tests.engine_app",
            "--queues",
            "default",
            "--concurrency",
            "4",
            *extra,
            name=name,
        )

    def consumer(self, name: str = "consumer") -> Proc:
        return self.start("consume", name=name)

    def outputs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-3000:]}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        keys = list(self.redis.scan_iter(match=self.keys.pattern, count=1000))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


@pytest.fixture
def cluster(
    pg_engine: Engine, postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    c = Cluster(postgres_url, redis_url, tmp_path)
    yield c
    c.close()


def finished(engine: Engine, cluster: Cluster, *ids: str, timeout: float = 30) -> None:
    wait_for(
        lambda: all(Workflow.get(engine, i).finished for i in ids),
        timeout,
        f"workflows {ids} to finish",
        on_timeout=cluster.outputs,
    )


def runs(cluster: Cluster) -> Counter[tuple[str, str, int]]:
    return Counter(
        (r["wf"], r["step"], r["attempt"])
        for r in app.perform_log(cluster.log)
        if r.get("phase") in (None, "start")
    )


def ctx(cluster: Cluster, **extra: Any) -> dict[str, Any]:
    return {"log": str(cluster.log), **extra}


def test_chain_passes_results_along(pg_engine: Engine, cluster: Cluster) -> None:
    wf = (
        Workflow.new("chain", ctx(cluster))
        .add("a", app.Add.new({"base": 1, "values": [2]}))
        .add("b", app.AsyncDouble.new({"value": Workflow.result("a")}), deps=["a"])
        .add("c", app.Add.new({"base": Workflow.result("b"), "values": [1]}), deps=["b"])
    )
    cluster.consumer()
    cluster.worker()
    wid = Workflow.insert(wf, pg_engine).id
    finished(pg_engine, cluster, wid)
    record = Workflow.get(pg_engine, wid)
    assert record.outcome == "completed"
    assert Workflow.results(pg_engine, wid) == {"a": 3, "b": 6, "c": 7}
    assert set(runs(cluster).values()) == {1}


def test_fan_out_fan_in_join_receives_all_results(pg_engine: Engine, cluster: Cluster) -> None:
    wf = Workflow.new("fan", ctx(cluster)).add("root", app.Add.new({"base": 1}))
    for i in range(10):
        wf = wf.add(
            f"p{i}", app.Add.new({"base": Workflow.result("root"), "values": [i]}), deps=["root"]
        )
    wf = wf.add(
        "join",
        app.Add.new({"values": [Workflow.result(f"p{i}") for i in range(10)]}),
        deps=[f"p{i}" for i in range(10)],
    )
    cluster.consumer()
    cluster.worker("w1")
    cluster.worker("w2")
    wid = Workflow.insert(wf, pg_engine).id
    finished(pg_engine, cluster, wid)
    assert Workflow.get(pg_engine, wid).outcome == "completed"
    assert Workflow.results(pg_engine, wid)["join"] == sum(1 + i for i in range(10))
    counted = runs(cluster)
    assert len(counted) == 12 and set(counted.values()) == {1}


def test_failure_cascades_and_continue_cleanup_runs(pg_engine: Engine, cluster: Cluster) -> None:
    wf = (
        Workflow.new("fails", ctx(cluster))
        .add("work", app.Explode.new())
        .add("after", app.Echo.new(), deps=["work"])
        .add("cleanup", app.Echo.new(), deps=[Dep("work", policy="continue")])
        .add("cancelled", app.CancelsItself.new())
        .add("retried", app.FailsUntil.new({"succeed_on": 2}))
    )
    cluster.consumer()
    cluster.worker()
    wid = Workflow.insert(wf, pg_engine).id
    finished(pg_engine, cluster, wid)
    record = Workflow.get(pg_engine, wid)
    states = {n: s.state.value for n, s in record.steps.items()}
    assert states == {
        "work": "failed",
        "after": "cancelled",
        "cleanup": "completed",
        "cancelled": "cancelled",
        "retried": "completed",
    }
    assert record.outcome == "failed"
    assert record.steps["after"].cancelled_by_step == "work"
    assert record.steps["retried"].attempt == 2
    with pg_engine.connect() as conn:
        history = conn.execute(
            select(t.attempts.c.attempt, t.attempts.c.status, t.attempts.c.payload)
            .where(t.attempts.c.workflow_id == wid, t.attempts.c.step == "retried")
            .order_by(t.attempts.c.attempt)
        ).all()
    assert [(h.attempt, h.status) for h in history] == [(1, "retryable"), (2, "completed")]
    assert "fails on purpose" in history[0].payload["error"]
    assert "after" not in {s for _, s, _ in runs(cluster)}


def test_sigkill_mid_step_runs_it_again_once_after_the_lease(
    pg_engine: Engine, cluster: Cluster
) -> None:
    wf = (
        Workflow.new("kill", ctx(cluster))
        .add("slow", app.SleepsFirstTime.new({"seconds": 120}))
        .add("next", app.Echo.new(), deps=["slow"])
    )
    cluster.consumer()
    doomed = cluster.worker("doomed", "--lease-seconds", "2")
    wid = Workflow.insert(wf, pg_engine).id
    wait_for(
        lambda: runs(cluster)[(wid, "slow", 1)] == 1,
        20,
        "attempt 1 to start",
        on_timeout=cluster.outputs,
    )
    doomed.kill()
    cluster.worker("rescuer", "--lease-seconds", "2")
    finished(pg_engine, cluster, wid)
    assert Workflow.get(pg_engine, wid).outcome == "completed"
    assert runs(cluster) == Counter({(wid, "slow", 1): 1, (wid, "slow", 2): 1, (wid, "next", 1): 1})
    with pg_engine.connect() as conn:
        repairs = conn.execute(
            select(t.recoveries.c.repair, t.recoveries.c.step).where(
                t.recoveries.c.workflow_id == wid
            )
        ).all()
    assert [(r.repair, r.step) for r in repairs] == [("lease_expired", "slow")]


def test_duplicate_ready_and_completion_messages_start_nothing_twice(
    pg_engine: Engine, cluster: Cluster
) -> None:
    wf = Workflow.new("dups", ctx(cluster)).add("a", app.Echo.new())
    for i in range(5):
        wf = wf.add(f"b{i}", app.Echo.new(), deps=["a"])
    cluster.consumer()
    cluster.worker()
    wid = Workflow.insert(wf, pg_engine).id
    finished(pg_engine, cluster, wid)
    # Replay every message ever published, three times over, into the live streams.
    streams = [cluster.keys.completions, cluster.keys.ready("default")]
    # A child its parent's worker claimed directly (hand-off) had no ready message, so
    # count what was actually published rather than one per step.
    published_ready = len(cluster.redis.xrange(streams[1]))
    replayed = 0
    for stream in streams:
        for _id, fields in cluster.redis.xrange(stream):
            for _ in range(3):
                cluster.redis.xadd(stream, fields)
                replayed += 1
    ready_before = [decode_ready(f) for _i, f in cluster.redis.xrange(streams[1])]
    assert replayed > 0 and ready_before

    def evidence_rows() -> list[tuple[str, str]]:
        e = t.evidence
        with pg_engine.connect() as conn:
            return [
                (r.kind, r.classification)
                for r in conn.execute(
                    select(e.c.kind, e.c.classification).where(e.c.workflow_id == wid)
                )
            ]

    wait_for(
        lambda: len([r for r in evidence_rows() if r[1] in ("duplicate", "late")]) >= replayed,
        20,
        "every replayed message to be classified",
        on_timeout=cluster.outputs,
    )
    assert set(runs(cluster).values()) == {1}
    assert len(runs(cluster)) == 6
    kinds = Counter(evidence_rows())
    assert kinds[("event", "consumed")] == 6
    assert published_ready >= 1
    assert kinds[("delivery", "late")] >= 3 * published_ready  # ready messages, finished steps
    assert kinds[("event", "duplicate")] == 3 * 6


def test_sigterm_drains_in_flight_steps(pg_engine: Engine, cluster: Cluster) -> None:
    wf = Workflow.new("drain", ctx(cluster)).add("slow", app.Sleeps.new({"seconds": 1.5}))
    cluster.consumer()
    worker = cluster.worker("draining", "--drain-seconds", "30")
    wid = Workflow.insert(wf, pg_engine).id
    wait_for(
        lambda: runs(cluster)[(wid, "slow", 1)] == 1,
        20,
        "the step to start",
        on_timeout=cluster.outputs,
    )
    assert worker.terminate(timeout=30) == 0
    assert "worker.draining" in worker.output()
    step = Workflow.get(pg_engine, wid).steps["slow"]
    assert (step.state.value, step.attempt) == ("completed", 1)
    phases = [r["phase"] for r in app.perform_log(cluster.log)]
    assert phases == ["start", "end"]


def test_processes_exit_with_a_clear_message_when_services_are_down(
    pg_engine: Engine, cluster: Cluster
) -> None:
    bad_redis = cluster.start("consume", "--redis-url", "redis://127.0.0.1:1/0", name="bad-redis")
    assert bad_redis.popen.wait(30) == 1
    assert "cannot reach Redis" in bad_redis.output()
    assert "Traceback" not in bad_redis.output()
    bad_pg = cluster.start(
        "worker", "--database-url", "postgresql://postgres@127.0.0.1:1/nope", name="bad-pg"
    )
    assert bad_pg.popen.wait(30) == 1
    assert "cannot use the database" in bad_pg.output()
    assert "Traceback" not in bad_pg.output()
