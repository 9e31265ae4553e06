"""DBOS Transact: workflows and steps checkpointed to PostgreSQL, run from queues with
worker_concurrency 4, in one process of its own (`benchmarks.peers.dbos_app`)."""

from __future__ import annotations

import dataclasses
import json
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.systems.base import BenchError, Proc, System, env_for, python
from benchmarks.systems.celery import _fill_from_timings
from benchmarks.workloads import Outcome, Workload


class DbosSystem(System):
    name = "dbos"
    durability = (
        "durable: each step's output and each workflow's status checkpointed to PostgreSQL "
        "before the next step; a crashed process's workflows resume from the last step"
    )

    def setup(self) -> None:
        self.database = self.ctx.pg.create_database("bench_dbos")
        self.url = self.ctx.pg.sqlalchemy_url(self.database)

    def teardown(self) -> None:
        if self.database:
            self.ctx.pg.drop_database(self.database)

    def version(self) -> str:
        from importlib.metadata import version

        return version("dbos")

    def start(self, workload: Workload, timing_file: Path) -> None:
        spec = json.dumps(dataclasses.asdict(workload))
        self.proc = Proc(
            [python(), "-m", "benchmarks.peers.dbos_app", spec, self.url],
            env_for(timing_file, BENCH_CONCURRENCY=str(self.ctx.concurrency)),
            timing_file.parent / "dbos.log",
            stdin=True,
        )
        assert self.proc.popen.stdout is not None
        line = self.proc.popen.stdout.readline()
        if line.strip() != "ready":
            self.proc.popen.wait(10)
            raise BenchError(f"dbos did not start: {line!r}\n{self.proc.output()[-2000:]}")

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def drive(self, workload: Workload) -> Outcome:
        popen = self.proc.popen
        assert popen.stdin is not None and popen.stdout is not None
        popen.stdin.write("go\n")
        popen.stdin.flush()
        # bounded: the app answers once every result is in, or the run is abandoned
        deadline = time.monotonic() + self.ctx.timeout
        sel = selectors.DefaultSelector()
        sel.register(popen.stdout, selectors.EVENT_READ)
        line = ""
        while not line:
            if time.monotonic() > deadline:
                raise BenchError(f"dbos: {workload.key} did not finish in time")
            if sel.select(timeout=1.0):
                line = popen.stdout.readline()
                if not line:
                    raise BenchError(f"dbos exited:\n{self.proc.output()[-2000:]}")
        sel.close()
        answer: dict[str, Any] = json.loads(line)
        self.answer = answer
        return Outcome(
            workload=workload.key,
            steps=workload.steps,
            workflows=workload.workflows,
            first_submit=answer["t_start"],
            last_finish=answer["t_start"],
            max_submit_lag_ms=answer["lag_ms"],
        )

    def stop(self) -> None:
        popen = self.proc.popen
        if popen.poll() is None and popen.stdin is not None:
            try:
                popen.stdin.write("exit\n")
                popen.stdin.flush()
                popen.wait(30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass  # it will be signalled below
        self.proc.stop()

    def collect(self, workload: Workload, outcome: Outcome, timing_file: Path) -> None:
        _fill_from_timings(workload, outcome, timing_file, self.answer["t_start"])
        results = self.answer["results"]
        outcome.wrong_results += sum(
            1 for i, v in enumerate(results) if v != workload.expected_result(i)
        )
