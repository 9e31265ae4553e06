"""What every system offers the harness, and the harness that measures one run.

A run: start the system's processes and wait until they say they are ready; read the
counters; sample CPU and RSS while the workload is submitted and finishes; stop the
processes (PostgreSQL backends flush their counters as they exit); read the counters
again; only then read back timings and results — reading them is not part of the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.probes import Sampler
from benchmarks.servers import Postgres, RedisServer
from benchmarks.workloads import Outcome, Workload

ROOT = Path(__file__).resolve().parents[2]


class BenchError(RuntimeError):
    """A run could not be measured (a process died, a deadline passed)."""


@dataclass
class Ctx:
    """What a system gets to run with: the servers and a scratch directory."""

    pg: Postgres
    pg_url: str
    redis: RedisServer
    workdir: Path
    concurrency: int = 4
    timeout: float = 300.0
    #: Wait this long between "ready" and the first counter reading: a PostgreSQL backend
    #: flushes its counters up to 1 s after its last transaction, so start-up commits
    #: would otherwise land inside the run.
    settle_seconds: float = 0.0


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, stdin: bool = False):
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log if not stdin else subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=stdin,
            start_new_session=True,  # a Ctrl-C to the suite must not hit it mid-measure
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output():
            if self.popen.poll() is not None:
                raise BenchError(f"{self.log_path.name} exited:\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.log_path.name} not ready:\n{self.output()[-2000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def env_for(timing_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_TIMING_FILE"] = str(timing_file)
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


class System(ABC):
    name: str
    #: What survives a crash, said plainly for the table.
    durability: str
    #: The PostgreSQL database it writes to (None: it does not use PostgreSQL).
    database: str | None = None
    #: The Redis db number it uses (None: it does not use Redis).
    redis_db: int | None = None

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def setup(self) -> None:  # noqa: B027 - optional
        """Once per suite run: scratch database, migrations."""

    def teardown(self) -> None:  # noqa: B027 - optional
        """Once per suite run: drop what setup made."""

    @abstractmethod
    def start(self, workload: Workload, timing_file: Path) -> None:
        """Start the processes, return once they are ready for work."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Root pids of the system's processes (their children are counted too)."""

    @abstractmethod
    def drive(self, workload: Workload) -> Outcome:
        """Submit the workload on schedule, wait until every workflow finished. The
        outcome's latencies may be filled later, in `collect`."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the processes and close every connection to the servers."""

    @abstractmethod
    def collect(self, workload: Workload, outcome: Outcome, timing_file: Path) -> None:
        """After the run: fill latencies, hops and the result check."""

    def harness_transactions(self) -> int:
        """PostgreSQL transactions the harness itself ran in the system's database during
        the run (polling for completion), subtracted from its commits."""
        return 0

    def version(self) -> str:
        return ""


@dataclass
class RunFigures:
    system: str
    workload: str
    outcome: Outcome
    cpu_s: dict[str, float]
    peak_rss_bytes: int
    rss_series: list[int]
    pg_commits: int | None
    redis_commands: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def measure(system: System, workload: Workload, run_dir: Path) -> RunFigures:
    """One run of `workload` on `system`, measured."""
    ctx = system.ctx
    run_dir.mkdir(parents=True, exist_ok=True)
    timing = run_dir / "timings.txt"
    timing.unlink(missing_ok=True)
    if system.redis_db is not None:
        ctx.redis.client(system.redis_db).flushdb()
    sampler_pg = Postgres(ctx.pg_url) if system.database else None
    database = system.database
    groups = {"system": system.pids}
    if sampler_pg is not None and database is not None:
        groups["postgres"] = lambda: sampler_pg.backend_pids(database)
    if ctx.redis.pid is not None and system.redis_db is not None:
        redis_pid = ctx.redis.pid
        groups["redis"] = lambda: [redis_pid]
    started = False
    try:
        system.start(workload, timing)
        started = True
        time.sleep(ctx.settle_seconds)
        sampler = Sampler(groups, rss_groups=["system"])
        commits_before = ctx.pg.commits(database) if database else None
        commands_before = ctx.redis.commands_processed() if system.redis_db is not None else None
        sampler.start()
        outcome = system.drive(workload)
        cpu = sampler.stop()
        commands_after = ctx.redis.commands_processed() if system.redis_db is not None else None
        system.stop()
        started = False
        commits_after = ctx.pg.settle_commits(database) if database else None
    finally:
        if started:
            system.stop()
        if sampler_pg is not None:
            sampler_pg.close()
    system.collect(workload, outcome, timing)
    pg_commits = (
        commits_after - commits_before - system.harness_transactions()
        if commits_before is not None and commits_after is not None
        else None
    )
    # the INFO that read the first count is itself counted in the second
    redis_commands = (
        commands_after - commands_before - 1
        if commands_before is not None and commands_after is not None
        else None
    )
    return RunFigures(
        system=system.name,
        workload=workload.key,
        outcome=outcome,
        cpu_s=cpu,
        peak_rss_bytes=sampler.peak_rss.get("system", 0),
        rss_series=sampler.rss_series.get("system", []),
        pg_commits=pg_commits,
        redis_commands=redis_commands,
    )
