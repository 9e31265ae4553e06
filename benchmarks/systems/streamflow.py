"""Streamflow as it is deployed: two `streamflow worker --concurrency 2` processes (the
suite's concurrency, 4, shared between them) and one `streamflow consume` process
(completion consumer, dispatcher, reconciler), against a scratch PostgreSQL database and
a Redis db of the suite's own server."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import psycopg
from sqlalchemy import Engine, text

from benchmarks.peers.streamflow_app import build
from benchmarks.systems.base import BenchError, Proc, System, env_for, python
from benchmarks.workloads import Outcome, Workload
from benchmarks.workloads.body import read_timings
from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Workflow
from streamflow.streams import Publisher, StreamKeys, connect

#: Submissions publish their first steps themselves (see `start`); False leaves them to
#: the dispatcher, as an application without Redis access would.
INSERT_PUBLISHES = True

#: Worker processes, the suite's concurrency shared between them: one per core. Each
#: has its own interpreter lock and its own group commit; measured against one process
#: of `--concurrency 4` (5 interleaved pairs): W1 465 -> 599 steps/s, W2 323 -> 374.
WORKER_PROCESSES = 2


def worker_shares(concurrency: int) -> list[int]:
    """`concurrency` split over up to WORKER_PROCESSES processes, each running at least one
    step at a time: 4 -> [2, 2], 5 -> [3, 2], 1 -> [1]."""
    processes = max(1, min(WORKER_PROCESSES, concurrency))
    return [concurrency // processes + (n < concurrency % processes) for n in range(processes)]


_TABLES = (
    "streamflow_workflows, streamflow_steps, streamflow_edges, streamflow_attempts, "
    "streamflow_results, streamflow_evidence, streamflow_recoveries"
)


class StreamflowSystem(System):
    name = "streamflow"
    durability = (
        "durable: every claim, result and release committed to PostgreSQL (fsync on) "
        "before it is acknowledged; Redis may lose anything, the reconciler repairs it"
    )
    redis_db = 1

    def setup(self) -> None:
        self.database = self.ctx.pg.create_database("bench_streamflow")
        self.url = self.ctx.pg.sqlalchemy_url(self.database)
        engine = make_engine(self.url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    def teardown(self) -> None:
        if self.database:
            self.ctx.pg.drop_database(self.database)

    def version(self) -> str:
        from importlib.metadata import version

        return version("streamflow")

    def start(self, workload: Workload, timing_file: Path) -> None:
        assert self.database is not None
        self._polls = 0
        engine = make_engine(self.url)
        with engine.begin() as conn:  # every run starts from an empty ledger
            conn.execute(text(f"TRUNCATE {_TABLES}, streamflow_reconciler_passes CASCADE"))
        self.engine: Engine = engine
        with engine.connect() as conn:  # the insert pool's first connection, made now
            conn.execute(text("SELECT 1"))
        redis_url = f"{self.ctx.redis.url}/{self.redis_db}"
        # As an application with Redis would submit: the insert publishes the first
        # steps itself (`Workflow.insert(..., publisher=...)`), no dispatcher in between.
        self.publisher = Publisher(connect(redis_url), StreamKeys()) if INSERT_PUBLISHES else None
        env = env_for(timing_file, STREAMFLOW_DATABASE_URL=self.url, STREAMFLOW_REDIS_URL=redis_url)
        logs = timing_file.parent
        self.consumer = Proc(
            [python(), "-m", "streamflow", "consume"], env, logs / "streamflow-consume.log"
        )
        self.workers = [
            Proc(
                [
                    python(),
                    "-m",
                    "streamflow",
                    "worker",
                    "--app",
                    "benchmarks.peers.streamflow_app",
                    "--queues",
                    "default",
                    "--concurrency",
                    str(share),
                ],
                env,
                logs / f"streamflow-worker-{n}.log",
            )
            for n, share in enumerate(worker_shares(self.ctx.concurrency))
        ]
        #: The first worker (what `benchmarks.profile` attaches to).
        self.worker = self.workers[0]
        self.procs = [self.consumer, *self.workers]
        self.consumer.wait_for_output('"maintenance.started"', 60)
        self.consumer.wait_for_output('"consumer.started"', 60)
        for worker in self.workers:
            worker.wait_for_output('"worker.started"', 60)
        # the harness's own connection: its polls are counted and subtracted
        self.observer = psycopg.connect(self.ctx.pg.dsn(self.database), autocommit=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _finished(self) -> int:
        self._polls += 1
        row = self.observer.execute(
            "SELECT count(*) FROM streamflow_workflows WHERE state = 'finished'"
        ).fetchone()
        return int(row[0]) if row else 0

    def drive(self, workload: Workload) -> Outcome:
        arrivals = workload.arrivals()
        self.ids: dict[str, int] = {}
        t_start = time.time()
        lag = 0.0
        for i, offset in enumerate(arrivals):
            due = t_start + offset
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            lag = max(lag, time.time() - due)
            persisted = Workflow.insert(build(workload, i), self.engine, publisher=self.publisher)
            self.ids[persisted.id] = i
            if i % 50 == 0:
                self._check_alive()
        deadline = time.monotonic() + self.ctx.timeout
        while self._finished() < workload.workflows:
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"streamflow: {workload.key} did not finish in time")
            time.sleep(0.05)
        self.t_start = t_start
        return Outcome(
            workload=workload.key,
            steps=workload.steps,
            workflows=workload.workflows,
            first_submit=t_start,
            last_finish=t_start,  # set in collect, from the ledger
            max_submit_lag_ms=lag * 1000,
        )

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise BenchError(f"streamflow process died:\n{p.output()[-2000:]}")

    def harness_transactions(self) -> int:
        return self._polls

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if getattr(self, "observer", None) is not None:
            self.observer.close()
            self.observer = None
        self.engine.dispose()

    def collect(self, workload: Workload, outcome: Outcome, timing_file: Path) -> None:
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                wfs = conn.execute(
                    text("SELECT id, finished_at, outcome FROM streamflow_workflows")
                ).all()
                last = conn.execute(
                    text("SELECT workflow_id, payload FROM streamflow_results WHERE step = :s"),
                    {"s": workload.last_step},
                ).all()
        finally:
            engine.dispose()
        arrivals = workload.arrivals()
        finished: dict[int, float] = {}
        for wid, at, result in wfs:
            i = self.ids[wid]
            finished[i] = _epoch(at)
            if result != "completed":
                outcome.wrong_results += 1
        outcome.latencies_ms = [
            (finished[i] - (self.t_start + arrivals[i])) * 1000 for i in sorted(finished)
        ]
        outcome.last_finish = max(finished.values())
        # As for the peers: from the parent's body end, so the hop holds everything the
        # engine does between two steps (recording the parent included), whatever point
        # of that work the ledger's timestamps mark.
        timings = read_timings(timing_file)
        for by_step in timings.values():
            for parent, child in workload.edges():
                if child in by_step and parent in by_step:
                    outcome.hops_ms.append((by_step[child][0] - by_step[parent][1]) * 1000)
        values = {self.ids[w]: payload for w, payload in last}
        outcome.wrong_results += sum(
            1 for i in range(workload.workflows) if values.get(i) != workload.expected_result(i)
        )


def _epoch(at: datetime | str) -> float:
    if isinstance(at, str):  # SQLite would give text; PostgreSQL gives datetimes
        at = datetime.fromisoformat(at)
    return at.timestamp()
