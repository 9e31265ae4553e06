"""Steps per second with 1, 2 and 4 worker processes x 1 and 2 consumer processes.

Every configuration runs the same workload against the same PostgreSQL (a throwaway
database) and Redis: fan-out/fan-in workflows (a root, eight parallel steps, a join; ten
steps each) whose steps do nothing but note who ran them, so the figure is the engine's
own throughput — claims, outcomes, releases, completion events — not the work's. Real
`streamflow worker` and `streamflow consume` processes, started before the clock starts;
the workflows are inserted in one transaction and the clock runs from its commit to
the last workflow finished. Each process's exit
summary (`worker.stopped`, `consumer.stopped`) says what it handled, and the perform log
is checked: no step may run twice.

    python -m benchmarks.multiprocess            # 200 workflows (2,000 steps), 3 repeats
    python -m benchmarks.multiprocess --quick    # 40 workflows, 3 repeats, a minute or so

Prints the median and the spread (min-max) per configuration, side by side, and writes
benchmarks/results/multiprocess.json. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.engine import make_url

from benchmarks._mp_app import Note
from ledger import tables as t
from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow import Workflow
from streamflow.streams.keys import StreamKeys

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
FAN = 8
RESULTS = ROOT / "benchmarks" / "results" / "multiprocess.json"


@dataclass
class Run:
    seconds: float
    steps: int
    #: Steps each worker process ran (from the perform log), by process.
    per_worker: list[int]
    #: Completion events each consumer process applied (its exit summary).
    per_consumer: list[int]

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


@dataclass
class Config:
    workers: int
    consumers: int
    runs: list[Run] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [r.steps_per_s for r in self.runs]


def workflow(i: int, log: str) -> Workflow:
    wf = Workflow.new("bench-fan", {"log": log}).add("root", Note.new({"i": i}))
    for k in range(FAN):
        wf = wf.add(f"p{k}", Note.new({"k": k}), deps=["root"])
    return wf.add("join", Note.new({}), deps=[f"p{k}" for k in range(FAN)])


class Stack:
    """The engine processes of one run."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "streamflow", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            want = '"event": "worker.started"' if name.startswith("w") else "consumer.started"
            while want not in self.output(name):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.output(name)[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.output(name)[-2000:]}")
                time.sleep(0.05)

    def stop(self, timeout: float = 60) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                print(f"warning: {name} did not stop within {timeout}s", file=sys.stderr)

    def summary(self, name: str, event: str) -> dict[str, Any]:
        for line in reversed(self.output(name).splitlines()):
            if f'"event": "{event}"' in line:
                return dict(json.loads(line))
        return {}


def run_once(
    engine: Engine, pg_url: str, redis_url: str, cfg: Config, workflows: int, partitions: int
) -> Run:
    _truncate(engine)
    prefix = f"sfbench{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="sf-multiprocess-"))
    log = workdir / "performs.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        STREAMFLOW_DATABASE_URL=pg_url,
        STREAMFLOW_REDIS_URL=redis_url,
        STREAMFLOW_STREAM_PREFIX=prefix,
        STREAMFLOW_STREAM_PARTITIONS=str(partitions),
    )
    stack = Stack(env, workdir)
    try:
        for c in range(cfg.consumers):
            stack.start(f"c{c + 1}", "consume")
        for w in range(cfg.workers):
            stack.start(f"w{w + 1}", "worker", "--app", "benchmarks._mp_app", "--concurrency", "8")
        stack.wait_started()
        # All workflows in one transaction, and the clock starts at its commit: the
        # figure is the engine running steps, not the caller inserting workflows.
        with engine.begin() as conn:
            ids = [Workflow.insert(workflow(i, str(log)), conn).id for i in range(workflows)]
            started = time.perf_counter()
        _wait_finished(engine, ids, timeout=600)
        seconds = time.perf_counter() - started
    finally:
        stack.stop()
        _delete_keys(redis_url, prefix, partitions)
    runs = Counter(tuple(line.split()[:3]) for line in log.read_text().splitlines())
    twice = [k for k, n in runs.items() if n > 1]
    if twice:
        raise RuntimeError(f"steps ran twice for one attempt: {twice[:5]}")
    pids = Counter(line.split()[3] for line in log.read_text().splitlines())
    per_worker = sorted(pids.values(), reverse=True)
    per_worker += [0] * (cfg.workers - len(per_worker))
    per_consumer = [
        int(stack.summary(f"c{c + 1}", "consumer.stopped").get("consumed", 0))
        for c in range(cfg.consumers)
    ]
    return Run(seconds, sum(runs.values()), per_worker, per_consumer)


def _wait_finished(engine: Engine, ids: list[str], timeout: float) -> None:
    w = t.workflows
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            left = conn.execute(
                select(w.c.id).where(w.c.id.in_(ids), w.c.state != "finished").limit(1)
            ).first()
        if left is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workflows unfinished after {timeout}s")
        time.sleep(0.02)


def _truncate(engine: Engine) -> None:
    names = ", ".join(tbl.name for tbl in reversed(t.metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


def _delete_keys(redis_url: str, prefix: str, partitions: int) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in StreamKeys(prefix, partitions=partitions).patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f}  ({min(values):.0f}-{max(values):.0f})"


def print_table(configs: list[Config], consumers: list[int]) -> None:
    head = "workers | " + " | ".join(
        f"{c} consumer{'s' if c > 1 else ''}: steps/s (min-max)" for c in consumers
    )
    print(head)
    by = {(c.workers, c.consumers): c for c in configs}
    for workers in sorted({c.workers for c in configs}):
        cells = [_spread(by[(workers, c)].rates()) for c in consumers]
        print(f"{workers:>7} | " + " | ".join(f"{cell:>30}" for cell in cells))
    print()
    print("work per process in the last repeat (steps per worker; events per consumer):")
    for c in configs:
        last = c.runs[-1]
        print(
            f"  {c.workers}w x {c.consumers}c: "
            f"workers {last.per_worker}  consumers {last.per_consumer}"
        )


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.multiprocess", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="40 workflows per run (400 steps)")
    parser.add_argument(
        "--workflows", type=int, default=None, help="workflows per run (default 200)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--consumers", default="1,2")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument(
        "--postgres-url", default=os.environ.get("STREAMFLOW_TEST_POSTGRES_URL", DEFAULT_PG)
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("STREAMFLOW_TEST_REDIS_URL", DEFAULT_REDIS)
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the processes are stopped and the database dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    workflows = args.workflows or (40 if args.quick else 200)
    workers = [int(x) for x in args.workers.split(",")]
    consumers = [int(x) for x in args.consumers.split(",")]
    if args.repeats < 1 or workflows < 1 or min(workers + consumers) < 1:
        parser.error("--repeats, --workflows, --workers and --consumers must be positive")

    admin_url = make_url(args.postgres_url).set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"streamflow_bench_mp_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    pg_url = admin_url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(pg_url)
    configs = [Config(w, c) for w in workers for c in consumers]
    try:
        upgrade(engine)
        # Repeats interleave the configurations, so a slow minute on a shared machine
        # spreads over all of them instead of landing on one.
        for repeat in range(args.repeats):
            for cfg in configs:
                run = run_once(engine, pg_url, args.redis_url, cfg, workflows, args.partitions)
                cfg.runs.append(run)
                print(
                    f"repeat {repeat + 1}: {cfg.workers}w x {cfg.consumers}c "
                    f"{run.steps} steps in {run.seconds:.2f}s = {run.steps_per_s:.0f} steps/s",
                    file=sys.stderr,
                )
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print_table(configs, consumers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "multiprocess",
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "workflows_per_run": workflows,
                "steps_per_workflow": FAN + 2,
                "partitions": args.partitions,
                "repeats": args.repeats,
                "configs": [
                    {
                        "workers": c.workers,
                        "consumers": c.consumers,
                        "median_steps_per_s": round(statistics.median(c.rates()), 1),
                        "min_steps_per_s": round(min(c.rates()), 1),
                        "max_steps_per_s": round(max(c.rates()), 1),
                        "runs": [
                            asdict(r) | {"steps_per_s": round(r.steps_per_s, 1)} for r in c.runs
                        ],
                    }
                    for c in configs
                ],
            },
            indent=2,
        )
        + "\n"
    )
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    print(f"\nwrote {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
