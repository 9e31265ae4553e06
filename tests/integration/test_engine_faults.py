"""The engine under infrastructure faults: real processes, real PostgreSQL, real Redis.

The fault tests run 30 workflows (chains passing results, fan-out/fan-in, a failure with
a `continue` cleanup edge, a retried step) through real `streamflow consume` and
`streamflow worker` processes, inject a fault mid-run by killing real things — a
`redis-server` this file started, PostgreSQL backends, engine processes — and then check
the ledger against what a fault-free run must produce:

- every workflow finished with the expected outcome, step states and results;
- every `perform` started at most once per (workflow, step, attempt), counted from the
  log the workers append to (so across processes, not assumed);
- every completed step has exactly one stored result, from its last attempt;
- each workflow's counters equal a recount of its steps' states.

Everything is bounded: conditions are polled with deadlines, never slept on. The tests
at the end pin engine bugs these faults found (fixed since).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from ledger import tables as t
from streamflow import Dep, Worker, Workflow
from streamflow.engine.context import StepContext
from tests import engine_app as app
from tests.integration.processes import ROOT, Proc, base_env, wait_for
from tests.ledger.helpers import recount

pytestmark = pytest.mark.postgres

#: How long a whole mix of workflows may take to finish once the fault is over.
FINISH_TIMEOUT = 60.0


# -- a worker whose steps take a little time -----------------------------------------------
# Worker processes import it from this module by its path, like any user's worker.


class SlowAdd(Worker):
    """Sleeps `sleep` seconds, then returns base + sum(values); logs every start."""

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        path = ctx.workflow_context["log"]
        line = {"wf": ctx.workflow_id, "step": ctx.step, "attempt": ctx.attempt, "pid": os.getpid()}
        # One short O_APPEND write lands whole, whichever process writes it.
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        time.sleep(args.get("sleep", 0.0))
        return int(args.get("base", 0)) + sum(args.get("values", []))


# -- the workflows, with the outcome a fault-free run gives -------------------------------


@dataclass(frozen=True)
class Expected:
    outcome: str
    states: dict[str, str]
    #: Stored results to compare, for the steps whose value the test can predict.
    results: dict[str, Any]


def chain(i: int, ctx: dict[str, Any], pause: float) -> tuple[Workflow, Expected]:
    wf = (
        Workflow.new("faults-chain", ctx)
        .add("a", SlowAdd.new({"base": i, "sleep": pause}))
        .add(
            "b",
            SlowAdd.new({"base": Workflow.result("a"), "values": [1], "sleep": pause}),
            deps=["a"],
        )
        .add(
            "c",
            SlowAdd.new({"base": Workflow.result("b"), "values": [1], "sleep": pause}),
            deps=["b"],
        )
    )
    done = dict.fromkeys("abc", "completed")
    return wf, Expected("completed", done, {"a": i, "b": i + 1, "c": i + 2})


def fan_in(i: int, ctx: dict[str, Any], pause: float, width: int = 4) -> tuple[Workflow, Expected]:
    wf = Workflow.new("faults-fan", ctx).add("root", SlowAdd.new({"base": i, "sleep": pause}))
    for k in range(width):
        args = {"base": Workflow.result("root"), "values": [k], "sleep": pause}
        wf = wf.add(f"p{k}", SlowAdd.new(args), deps=["root"])
    join = {"values": [Workflow.result(f"p{k}") for k in range(width)], "sleep": pause}
    wf = wf.add("join", SlowAdd.new(join), deps=[f"p{k}" for k in range(width)])
    states = dict.fromkeys(["root", *(f"p{k}" for k in range(width)), "join"], "completed")
    return wf, Expected("completed", states, {"root": i, "join": sum(i + k for k in range(width))})


def failing(ctx: dict[str, Any]) -> tuple[Workflow, Expected]:
    wf = (
        Workflow.new("faults-failing", ctx)
        .add("work", app.Explode.new())
        .add("after", app.Echo.new(), deps=["work"])
        .add("cleanup", SlowAdd.new({"base": 7}), deps=[Dep("work", policy="continue")])
    )
    states = {"work": "failed", "after": "cancelled", "cleanup": "completed"}
    return wf, Expected("failed", states, {"cleanup": 7})


def retried(i: int, ctx: dict[str, Any], pause: float) -> tuple[Workflow, Expected]:
    wf = (
        Workflow.new("faults-retried", ctx)
        .add("flaky", app.FailsUntil.new({"succeed_on": 2}))
        .add("next", SlowAdd.new({"base": i, "sleep": pause}), deps=["flaky"])
    )
    states = {"flaky": "completed", "next": "completed"}
    return wf, Expected("completed", states, {"flaky": {"succeeded_on": 2}, "next": i})


def mix(ctx: dict[str, Any], pause: float = 0.15) -> list[tuple[Workflow, Expected]]:
    """30 workflows, about 115 `perform`s: 12 chains, 10 fan-ins, 4 failing, 4 retried."""
    out = [chain(i, ctx, pause) for i in range(12)]
    out += [fan_in(100 + i, ctx, pause) for i in range(10)]
    out += [failing(ctx) for _ in range(4)]
    out += [retried(200 + i, ctx, pause) for i in range(4)]
    return out


# -- a disposable redis-server, for killing -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A `redis-server` without persistence on a free port: killed, it restarts empty."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "redis-server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            wait_for(lambda: self._answers(probe), 10, "redis-server to answer PING")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.workdir / "redis-server.log").read_text(errors="replace")
            raise AssertionError(f"redis-server exited at start:\n{log[-2000:]}")
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; everything in memory is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server not installed")
        pytest.skip("redis-server not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


#: Log events by which a process shows it met an unreachable Redis (reading, acknowledging
#: or publishing when it went away).
OUTAGE_EVENTS = (
    "worker.stream_unavailable",
    "consumer.stream_unavailable",
    "maintenance.unavailable",
    "infra.retry",
    "stream.publish_failed",
)


# -- the processes of one test --------------------------------------------------------------


class Cluster:
    """Consumer and worker processes sharing a ledger, a Redis and a key prefix."""

    def __init__(self, postgres_url: str, redis_url: str, tmp: Path) -> None:
        self.prefix = f"sffault{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.tmp = tmp
        self.env = base_env(
            STREAMFLOW_DATABASE_URL=postgres_url,
            STREAMFLOW_REDIS_URL=redis_url,
            STREAMFLOW_STREAM_PREFIX=self.prefix,
        )
        self.procs: list[Proc] = []
        self.log = tmp / "performs.jsonl"
        self.ctx: dict[str, Any] = {"log": str(self.log)}

    def start(self, *args: str, name: str) -> Proc:
        p = Proc(list(args), self.env, self.tmp, name)
        self.procs.append(p)
        return p

    def consumer(self, name: str = "consumer") -> Proc:
        # A lost ready message is sent again after 1 s (checked every 5 s), not 30 s.
        return self.start("consume", "--redispatch-after", "1", name=name)

    def worker(self, name: str, *extra: str) -> Proc:
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

    def outputs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-3000:]}" for p in self.procs)

    def logged(self, event: str) -> int:
        """How many lines logging `event` the processes wrote, all together."""
        return sum(p.output().count(f'"event": "{event}"') for p in self.procs)

    def unaware_of_outage(self, since: dict[str, int]) -> list[str]:
        """Processes that have logged no sign of an outage since the `offsets()` given."""
        signs = [f'"event": "{e}"' for e in OUTAGE_EVENTS]
        return [
            p.name
            for p in self.procs
            if not any(sign in p.output()[since.get(p.name, 0) :] for sign in signs)
        ]

    def offsets(self) -> dict[str, int]:
        return {p.name: len(p.output()) for p in self.procs}

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=1)
        try:
            keys = list(client.scan_iter(match="{" + self.prefix + "}:*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.ConnectionError:
            pass  # a disposable server already gone takes its keys with it
        finally:
            client.close()


@pytest.fixture
def make_cluster(
    pg_engine: Engine, postgres_url: str, tmp_path: Path
) -> Iterator[Callable[[str], Cluster]]:
    made: list[Cluster] = []

    def make(redis_url: str) -> Cluster:
        c = Cluster(postgres_url, redis_url, tmp_path)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# -- checks -------------------------------------------------------------------------------


def runs(cluster: Cluster) -> Counter[tuple[str, str, int]]:
    return Counter(
        (r["wf"], r["step"], r["attempt"])
        for r in app.perform_log(cluster.log)
        if r.get("phase") in (None, "start")
    )


def performed(cluster: Cluster, n: int) -> Callable[[], bool]:
    return lambda: len(runs(cluster)) >= n


def insert_all(engine: Engine, workflows: list[tuple[Workflow, Expected]]) -> dict[str, Expected]:
    return {Workflow.insert(wf, engine).id: expected for wf, expected in workflows}


def wait_finished(engine: Engine, cluster: Cluster, ids: list[str]) -> None:
    w = t.workflows

    def unfinished() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(w.c.id).where(w.c.id.in_(ids), w.c.state != "finished").limit(1)
                ).first()
                is not None
            )

    wait_for(
        lambda: not unfinished(),
        FINISH_TIMEOUT,
        f"{len(ids)} workflows to finish",
        interval=0.1,
        on_timeout=lambda: stuck(engine, ids) + cluster.outputs(),
    )


def stuck(engine: Engine, ids: list[str]) -> str:
    s = t.steps
    with engine.connect() as conn:
        rows = conn.execute(
            select(s.c.workflow_id, s.c.name, s.c.state, s.c.attempt, s.c.dispatched_at).where(
                s.c.workflow_id.in_(ids), s.c.state.not_in(["completed", "failed", "cancelled"])
            )
        ).all()
    return "unfinished steps:\n" + "\n".join(str(tuple(r)) for r in rows[:40]) + "\n"


def check_ledger(engine: Engine, cluster: Cluster, expected: dict[str, Expected]) -> None:
    """The invariants of a fault-free run, checked against the ledger and the perform log."""
    ids = list(expected)
    for wid, want in expected.items():
        record = Workflow.get(engine, wid)
        assert record.finished and record.outcome == want.outcome, (wid, record.outcome)
        assert {n: s.state.value for n, s in record.steps.items()} == want.states, wid
        stored = Workflow.results(engine, wid)
        assert {k: stored.get(k) for k in want.results} == want.results, wid
        assert record.counters.as_dict() == recount(engine, wid), wid

    counted = runs(cluster)
    twice = {k: n for k, n in counted.items() if n > 1}
    assert not twice, f"perform started more than once for one attempt: {twice}"

    s, r = t.steps, t.results
    with engine.connect() as conn:
        completed = {
            (row.workflow_id, row.name): row.attempt
            for row in conn.execute(
                select(s.c.workflow_id, s.c.name, s.c.attempt).where(
                    s.c.workflow_id.in_(ids), s.c.state == "completed"
                )
            )
        }
        stored_rows = conn.execute(
            select(r.c.workflow_id, r.c.step, r.c.attempt).where(r.c.workflow_id.in_(ids))
        ).all()
    # The primary key allows one row per step; what matters is that every completed step
    # has its row, from the attempt that completed it, and nothing else has one.
    assert {(x.workflow_id, x.step): x.attempt for x in stored_rows} == completed
    assert len(stored_rows) == len(completed)
    # And each completed attempt really ran, in some worker process.
    not_run = [k for k, attempt in completed.items() if counted[(*k, attempt)] != 1]
    assert not not_run, f"completed without a logged perform: {not_run[:10]}"


def recoveries(engine: Engine, ids: list[str]) -> Counter[str]:
    rc = t.recoveries
    with engine.connect() as conn:
        return Counter(
            conn.execute(select(rc.c.repair).where(rc.c.workflow_id.in_(ids))).scalars().all()
        )


def assert_all_running(cluster: Cluster) -> None:
    dead = [p.name for p in cluster.procs if not p.running]
    assert not dead, f"processes exited: {dead}\n{cluster.outputs()}"


# -- Redis killed and restarted empty ---------------------------------------------------------


def test_redis_killed_and_restarted_empty_mid_run_loses_nothing(
    pg_engine: Engine, redis_server: RedisServer, make_cluster: Callable[[str], Cluster]
) -> None:
    cluster = make_cluster(redis_server.url)
    cluster.consumer()
    # Each worker holds at most 4 steps, so most of the 30 roots are still unread in the
    # ready stream when Redis dies (by default a worker reads 4 x concurrency ahead).
    cluster.worker("w1", "--in-flight", "4")
    cluster.worker("w2", "--in-flight", "4")
    expected = insert_all(pg_engine, mix(cluster.ctx))
    ids = list(expected)
    total = sum(len(e.states) for e in expected.values())

    # Mid-run: a few steps have run, and the roots not yet read wait in the ready stream.
    wait_for(lambda: len(runs(cluster)) >= 8, 30, "8 performs", on_timeout=cluster.outputs)
    before = cluster.offsets()
    redis_server.kill()
    assert len(runs(cluster)) < total
    wait_for(
        lambda: not cluster.unaware_of_outage(before),
        20,
        "every process to notice Redis is gone",
        on_timeout=lambda: f"{cluster.unaware_of_outage(before)} did not\n{cluster.outputs()}",
    )
    redis_server.start()  # the same port, nothing in it: no streams, no groups

    wait_finished(pg_engine, cluster, ids)
    check_ledger(pg_engine, cluster, expected)
    assert_all_running(cluster)
    # The fault is visible: groups were recreated, and the ready messages lost with the
    # old server (roots not yet read when it died) were dispatched again from the ledger,
    # with recovery rows saying so.
    # Whichever notices the empty server first recreates the groups: a reader meeting
    # NOGROUP (logged per group), or the reconciler's streams-reset repair (which creates
    # them before re-dispatching). Which one wins is timing, so either counts.
    assert (
        cluster.logged("stream.group_recreated") >= 2
        or cluster.logged("reconciler.streams_reset") >= 1
    ), cluster.outputs()
    assert recoveries(pg_engine, ids).total() >= 1


# -- PostgreSQL connections cut ------------------------------------------------------------------


def terminate_backends(postgres_url: str) -> int:
    """pg_terminate_backend on every other connection to this session's database."""
    killer = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with killer.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
            )
    finally:
        killer.dispose()


def test_postgres_connections_cut_mid_run_lose_and_duplicate_nothing(
    pg_engine: Engine,
    postgres_url: str,
    redis_url: str,
    make_cluster: Callable[[str], Cluster],
) -> None:
    cluster = make_cluster(redis_url)
    cluster.consumer()
    # A claim whose commit landed but whose reply was cut is found `executing` on retry and
    # not run: its lease (short here) expiring is what gives the step its next attempt.
    cluster.worker("w1", "--lease-seconds", "3")
    cluster.worker("w2", "--lease-seconds", "3")
    expected = insert_all(pg_engine, mix(cluster.ctx))
    ids = list(expected)

    terminated = []
    # Five cuts, spaced by progress rather than by the clock.
    for threshold in (5, 20, 35, 50, 65):
        wait_for(
            performed(cluster, threshold), 30, f"{threshold} performs", on_timeout=cluster.outputs
        )
        terminated.append(terminate_backends(postgres_url))
    assert all(n > 0 for n in terminated), terminated

    wait_finished(pg_engine, cluster, ids)
    check_ledger(pg_engine, cluster, expected)
    assert_all_running(cluster)


# -- engine processes SIGKILLed --------------------------------------------------------------------


def test_worker_and_consumer_sigkilled_mid_run_and_replaced(
    pg_engine: Engine, redis_url: str, make_cluster: Callable[[str], Cluster]
) -> None:
    cluster = make_cluster(redis_url)
    consumer = cluster.consumer("consumer-1")
    doomed = cluster.worker("doomed", "--lease-seconds", "2")
    cluster.worker("survivor", "--lease-seconds", "2")
    expected = insert_all(pg_engine, mix(cluster.ctx, pause=0.3))
    ids = list(expected)

    wait_for(lambda: len(runs(cluster)) >= 10, 30, "10 performs", on_timeout=cluster.outputs)
    doomed.kill()  # mid-step: it runs up to 4 steps at a time, each 0.3 s
    consumer.kill()  # its pending completions and the dispatcher die with it
    cluster.worker("replacement", "--lease-seconds", "2")
    cluster.consumer("consumer-2")

    wait_finished(pg_engine, cluster, ids)
    check_ledger(pg_engine, cluster, expected)
    assert not doomed.running and not consumer.running
    # Every attempt the dead worker started was recorded, by itself before it died or by
    # the lease rescue after; and only leases the dead worker held needed rescuing (some
    # it may have claimed without starting), each rescue once, with a recovery row.
    started = {
        (r["wf"], r["step"], r["attempt"])
        for r in app.perform_log(cluster.log)
        if r["pid"] == doomed.popen.pid
    }
    a, rc = t.attempts, t.recoveries
    with pg_engine.connect() as conn:
        recorded = {
            (x.workflow_id, x.step, x.attempt)
            for x in conn.execute(
                select(a.c.workflow_id, a.c.step, a.c.attempt).where(a.c.workflow_id.in_(ids))
            )
        }
        rescued = [
            (x.workflow_id, x.step, x.evidence["attempt"], x.evidence["lease_owner"])
            for x in conn.execute(
                select(rc.c.workflow_id, rc.c.step, rc.c.evidence).where(
                    rc.c.workflow_id.in_(ids), rc.c.repair == "lease_expired"
                )
            )
        ]
    assert started and started <= recorded
    assert len(rescued) == len({r[:3] for r in rescued})
    # Lease owners are named role-host-pid-suffix (streamflow.engine.common.consumer_name).
    assert {owner.split("-")[-2] for *_, owner in rescued} <= {str(doomed.popen.pid)}


# -- bugs these tests found, fixed: each pins the right behaviour -------------------------------


def test_a_long_step_name_does_not_kill_the_completion_consumer(
    pg_engine: Engine, redis_url: str, make_cluster: Callable[[str], Cluster]
) -> None:
    cluster = make_cluster(redis_url)
    long_name = "step-" + "x" * 175  # valid: step names may have up to 200 characters
    wf = (
        Workflow.new("long-names", cluster.ctx)
        .add(long_name, app.Echo.new())
        .add("after", app.Echo.new(), deps=[long_name])
    )
    consumer = cluster.consumer()
    cluster.worker("w1")
    wid = Workflow.insert(wf, pg_engine).id
    wait_finished(pg_engine, cluster, [wid])
    e = t.evidence

    def consumed() -> int:
        with pg_engine.connect() as conn:
            return len(
                conn.execute(
                    select(e.c.id).where(
                        e.c.workflow_id == wid,
                        e.c.kind == "event",
                        e.c.classification == "consumed",
                    )
                ).all()
            )

    wait_for(
        lambda: consumed() == 2 or not consumer.running,
        20,
        "both completion events consumed, or the consumer gone",
        on_timeout=cluster.outputs,
    )
    assert consumer.running, consumer.output()[-2000:]
    assert consumed() == 2


def test_complete_by_hand_with_redis_down_records_and_the_dispatcher_starts_children(
    pg_engine: Engine, redis_url: str, make_cluster: Callable[[str], Cluster]
) -> None:
    cluster = make_cluster(redis_url)
    wf = (
        Workflow.new("by-hand", cluster.ctx)
        .add("manual", app.Echo.new(queue="manual"))  # no worker reads this queue
        .add("next", app.Echo.new(), deps=["manual"])
    )
    cluster.start("consume", name="consumer")  # the default 30 s redispatch deadline
    cluster.worker("w1")
    wid = Workflow.insert(wf, pg_engine).id
    down = f"redis://127.0.0.1:{_free_port()}/0"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamflow",
            "complete",
            wid,
            "manual",
            "--payload",
            '{"by": "hand"}',
            "--redis-url",
            down,
            "--json",
        ],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The outcome was recorded either way; the command must say so, not fail.
    assert Workflow.get(pg_engine, wid).steps["manual"].state.value == "completed"
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["published"] is False
    # Well inside the 30 s stale deadline: the dispatcher, not the rescue, starts it.
    wait_finished(pg_engine, cluster, [wid])
    assert runs(cluster)[(wid, "next", 1)] == 1
