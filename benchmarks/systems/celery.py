"""Celery 5 with prefork workers (`-c 4`), Redis broker and result backend, chain and
chord, acks_late."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchmarks.systems.base import BenchError, Proc, System, env_for, python
from benchmarks.workloads import Outcome, Workload
from benchmarks.workloads.body import count_finished, read_timings


class CelerySystem(System):
    name = "celery"
    durability = (
        "not durable across a Redis loss: chain/chord state lives only in Redis messages and "
        "keys (no AOF here); acks_late redelivers a task whose worker died"
    )
    redis_db = 2

    def version(self) -> str:
        import celery

        return str(celery.__version__)

    def start(self, workload: Workload, timing_file: Path) -> None:
        url = f"{self.ctx.redis.url}/{self.redis_db}"
        os.environ["BENCH_CELERY_REDIS"] = url  # read when the app module is first imported
        from benchmarks.peers import celery_app

        celery_app.app.conf.broker_url = url
        celery_app.app.conf.result_backend = url
        self.app = celery_app
        self._timings = timing_file
        self.worker = Proc(
            [
                python(),
                "-m",
                "celery",
                "-A",
                "benchmarks.peers.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(self.ctx.concurrency),
                "-Q",
                "bench",
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"bench-{os.getpid()}@%h",
            ],
            env_for(timing_file, BENCH_CELERY_REDIS=url),
            timing_file.parent / "celery-worker.log",
        )
        self.worker.wait_for_output(" ready.", 60)

    def pids(self) -> list[int]:
        return [self.worker.pid]

    def drive(self, workload: Workload) -> Outcome:
        arrivals = workload.arrivals()
        self.results: list[Any] = []
        t_start = time.time()
        lag = 0.0
        for i, offset in enumerate(arrivals):
            due = t_start + offset
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            lag = max(lag, time.time() - due)
            self.results.append(self.app.signature(workload, i).apply_async())
        deadline = time.monotonic() + self.ctx.timeout
        while count_finished(self._timings, workload.last_step) < workload.workflows:
            if self.worker.popen.poll() is not None:
                raise BenchError(f"celery worker died:\n{self.worker.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"celery: {workload.key} did not finish in time")
            time.sleep(0.05)
        self.t_start = t_start
        return Outcome(
            workload=workload.key,
            steps=workload.steps,
            workflows=workload.workflows,
            first_submit=t_start,
            last_finish=t_start,
            max_submit_lag_ms=lag * 1000,
        )

    def stop(self) -> None:
        self.worker.stop()

    def collect(self, workload: Workload, outcome: Outcome, timing_file: Path) -> None:
        _fill_from_timings(workload, outcome, timing_file, self.t_start)
        for i, result in enumerate(self.results):
            try:
                value = result.get(timeout=10)
            except Exception:
                value = None
            if value != workload.expected_result(i):
                outcome.wrong_results += 1
            result.forget()
        self.app.app.close()


def _fill_from_timings(
    workload: Workload, outcome: Outcome, timing_file: Path, t_start: float
) -> None:
    """Peers: end = the last step's body end; hop = child start - parent body end."""
    arrivals = workload.arrivals()
    timings = read_timings(timing_file)
    ends: list[float] = []
    for i, by_step in timings.items():
        if workload.last_step in by_step:
            end = by_step[workload.last_step][1]
            ends.append(end)
            outcome.latencies_ms.append((end - (t_start + arrivals[i])) * 1000)
        for parent, child in workload.edges():
            if parent in by_step and child in by_step:
                outcome.hops_ms.append((by_step[child][0] - by_step[parent][1]) * 1000)
    outcome.last_finish = max(ends) if ends else t_start
    outcome.wrong_results += workload.workflows - len(ends)
