"""The chaos harness: the same workflows through real processes, without faults and with.

One run (`execute_run`) is:

1. a throwaway PostgreSQL database (cloned from a migrated template this harness creates,
   dropped at the end) and a disposable `redis-server` without persistence on a free port;
2. real processes: one `streamflow consume` (completion consumer, dispatcher, reconciler
   with `--reconcile-every` and `--redispatch-after`), `workers` x `streamflow worker`, and
   — while `streamflow consume` has no flag for the reconciler's `dropped_after` grace —
   one extra reconciler process (`python -m chaos reconciler --dropped-after ...`, the
   same `Reconciler` with that one setting shorter), so completion events lost on the way
   are declared `dropped` within seconds rather than after the 30 s default;
3. for a chaos run, each process gets `STREAMFLOW_CHAOS` set to the fault plan with its own
   label, so its stream transport drops, duplicates, delays, replays and reorders messages
   (chaos/faults.py) and logs every fault;
4. the workload inserted in one transaction; process faults fired as the ledger reports
   progress (a worker SIGKILLed at 30% and a fresh one started; every ledger connection
   cut with `pg_terminate_backend` at 35% and 65%; Redis SIGKILLed at 45% and restarted
   empty a second later; the consumer process SIGKILLed at 55% and a fresh one started);
5. a bounded wait for every workflow to finish (time to converge), then for every fault
   to become visible in the ledger (delayed messages released, `dropped` declared...),
   then SIGTERM to every process and a snapshot of the ledger.

`run_chaos` runs a reference run and a chaos run of the same seeded workload and checks
the invariants (chaos/invariants.py) into a `Report` (chaos/report.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from chaos import invariants as inv
from chaos.faults import FaultPlan, read_fault_log
from chaos.report import ProcessFault, Report, RunSummary
from chaos.workers import QUEUES, read_perform_log
from chaos.workload import SHAPES, WorkloadItem, build_workload, describe
from ledger import tables as t
from ledger.db import make_engine
from streamflow import Workflow
from streamflow.streams import Publisher, StreamKeys
from streamflow.streams import connect as connect_streams
from streamflow.streams.seam import wrap_for_chaos

ROOT = Path(__file__).resolve().parents[1]
#: The packages engine processes run from, copied once per session (see `snapshot_source`).
SOURCE_PACKAGES = ("streamflow", "ledger", "chaos", "migrations")
SHAPE_NAMES = tuple(name for name, _ in SHAPES)
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STREAM_PREFIX = "chaos"
#: Spare attempts every step gets beyond its design, so a SIGKILLed worker or a claim
#: whose commit acknowledgement was cut (each costs an attempt) changes no outcome.
ATTEMPT_SLACK = 2

Progress = Callable[[str], None]
#: Writes are paused this long while the harness notes what Redis holds, then it is killed.
PAUSE_BEFORE_KILL_MS = 5000
#: How long a killed Redis stays down before it is restarted (empty).
REDIS_DOWN_S = 1.0
#: What each kind of process logs once it is up.
WORKER_STARTED: tuple[str, ...] = ("worker.started",)
CONSUMER_STARTED: tuple[str, ...] = (
    "consumer.started",
    "maintenance.started",
    "reconciler.started",
)


class HarnessError(RuntimeError):
    """The harness itself could not run (a server missing, a process that never started)."""


@dataclass(frozen=True)
class ChaosOptions:
    """Everything one chaos run needs. `python -m chaos --help` describes each flag."""

    #: Workflows in the seeded mix.
    workflows: int = 200
    #: Seeds the workload and every process's fault decisions.
    seed: int = 7
    #: Share of messages dropped, duplicated, delayed, replayed; of batches reordered.
    drop: float = 0.0
    dup: float = 0.0
    delay: float = 0.0
    replay: float = 0.0
    reorder: float = 0.0
    #: Which streams message faults hit: "completion" and/or "ready".
    streams: tuple[str, ...] = ("completion", "ready")
    delay_ms: tuple[int, int] = (200, 3000)
    replay_after_ms: tuple[int, int] = (500, 4000)
    #: Fates for particular messages, e.g. {"ready:flaky#2": "drop"} (see chaos/faults.py).
    script: dict[str, str] = field(default_factory=dict)
    #: Only these workflow shapes (chain, fan, retry, failure, cancel, diamond); () = all.
    shapes: tuple[str, ...] = ()
    #: SIGKILL a worker at 30% progress (mid-step) and start a fresh one.
    kill_worker: bool = False
    #: SIGKILL the consumer process (consumer, dispatcher, reconciler) at 55% progress
    #: (mid-batch) and start a fresh one.
    kill_consumer: bool = False
    #: SIGKILL redis-server at 45% progress and restart it empty.
    flush_redis: bool = False
    #: pg_terminate_backend every ledger connection at 35% and 65% progress.
    cut_postgres: bool = False
    workers: int = 3
    concurrency: int = 4
    lease_seconds: float = 4.0
    reconcile_every: float = 0.5
    redispatch_after: float = 2.0
    #: The extra reconciler's grace before an unconsumed completion event is `dropped`
    #: (None: no extra reconciler; the engine's 30 s default applies).
    dropped_after: float | None = 2.0
    #: Deadline for every workflow to finish.
    timeout: float = 300.0
    #: How long after convergence faults may take to become visible (None: worked out
    #: from the settings, see `settle_seconds`).
    settle: float | None = None
    #: Where to create throwaway databases (any database on the server; it is not used).
    postgres_url: str = DEFAULT_POSTGRES_URL
    #: The redis-server binary (default: found on PATH).
    redis_server: str | None = None
    #: Keep databases and logs here (default: a temporary directory, removed if all pass).
    workdir: str | None = None
    keep: bool = False
    #: A name for the report (the matrix names its scenarios).
    scenario: str = "custom"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(SHAPE_NAMES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; use {list(SHAPE_NAMES)}")
        if self.workflows < 1 or self.workers < 1 or self.concurrency < 1:
            raise ValueError("workflows, workers and concurrency must be at least 1")

    @property
    def workload_key(self) -> tuple[int, int, tuple[str, ...]]:
        """What decides the workload: runs with equal keys run the same workflows."""
        return self.workflows, self.seed, tuple(sorted(self.shapes))

    @property
    def message_faults(self) -> bool:
        rates = ("drop", "dup", "delay", "replay", "reorder")
        return bool(self.script) or any(getattr(self, k) > 0 for k in rates)

    @property
    def process_faults(self) -> bool:
        return self.kill_worker or self.kill_consumer or self.flush_redis or self.cut_postgres

    def plan(self, log: Path) -> FaultPlan:
        return FaultPlan(
            seed=self.seed,
            log=str(log),
            streams=tuple(self.streams),
            drop=self.drop,
            duplicate=self.dup,
            delay=self.delay,
            replay=self.replay,
            reorder=self.reorder,
            delay_ms=self.delay_ms,
            replay_after_ms=self.replay_after_ms,
            script=dict(self.script),
        )

    def settle_seconds(self) -> float:
        """How long after convergence faults may take to show (then the check fails)."""
        if self.settle is not None:
            return self.settle
        grace = (self.dropped_after or 30.0) + self.redispatch_after + 4 * self.reconcile_every
        grace += max(self.delay_ms[1], self.replay_after_ms[1]) / 1000
        if self.kill_worker or self.kill_consumer:
            # Entries a killed process read but never handled wait out the engine's 30 s
            # XAUTOCLAIM idle time (checked every 15 s) before anyone looks again.
            grace += 50
        return grace + 10

    def describe_faults(self) -> str:
        parts = [
            f"{name} {getattr(self, name):.2f}"
            for name in ("drop", "dup", "delay", "replay", "reorder")
            if getattr(self, name) > 0
        ]
        text = " ".join(parts) + f" on {','.join(self.streams)}" if parts else "no message faults"
        if self.script:
            text += " + script " + ", ".join(f"{k}={v}" for k, v in self.script.items())
        extra = [
            name
            for name, on in (
                ("kill-worker", self.kill_worker),
                ("kill-consumer", self.kill_consumer),
                ("flush-redis", self.flush_redis),
                ("cut-postgres", self.cut_postgres),
            )
            if on
        ]
        return text + (" + " + " + ".join(extra) if extra else "")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["postgres_url"] = make_url(self.postgres_url).render_as_string(hide_password=True)
        return data


# -- servers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A `redis-server` without persistence on a free loopback port: killed, it restarts
    empty."""

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
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            _wait(lambda: self._answers(probe), 10, "redis-server to answer PING")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.workdir / "redis-server.log").read_text(errors="replace")
            raise HarnessError(f"redis-server exited at start:\n{log[-2000:]}")
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    def unfinished_entries(self) -> set[tuple[str, str]]:
        """(stream, id) of every stream entry some group has not yet been delivered or
        has not acknowledged: what a kill right after this destroys unhandled.

        Clients' writes are paused first (CLIENT PAUSE WRITE, which holds XADD, XREADGROUP
        and XACK but not these reads), so nothing changes between this look and the kill.
        """
        client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)
        held: set[tuple[str, str]] = set()
        try:
            client.client_pause(PAUSE_BEFORE_KILL_MS, all=False)
            for key in client.scan_iter(match="*", count=1000, _type="stream"):
                groups = client.xinfo_groups(key)
                if not groups:
                    held |= {(key, str(i)) for i, _ in client.xrange(key) or []}
                for g in groups:
                    last = str(g["last-delivered-id"])
                    held |= {(key, str(i)) for i, _ in client.xrange(key, min=f"({last}") or []}
                    pending = client.xpending_range(key, g["name"], "-", "+", 100_000)
                    held |= {(key, str(p["message_id"])) for p in pending}
        except redis.RedisError:
            pass  # what could not be read is simply not excused
        finally:
            client.close()
        return held

    def describe(self) -> dict[str, Any]:
        """Every stream's groups, consumers and pending entries (kept for diagnosis)."""
        client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)
        out: dict[str, Any] = {}
        try:
            for key in sorted(client.scan_iter(match="*", count=1000, _type="stream")):
                groups = []
                for g in client.xinfo_groups(key):
                    name = g["name"]
                    groups.append(
                        {
                            **{k: v for k, v in g.items() if isinstance(v, str | int)},
                            "consumers_detail": client.xinfo_consumers(key, name),
                            "pending_entries": client.xpending_range(key, name, "-", "+", 50),
                        }
                    )
                out[key] = {"length": client.xlen(key), "groups": groups}
        except redis.RedisError as exc:
            out["error"] = repr(exc)
        finally:
            client.close()
        return out

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; everything it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def snapshot_source(dest: Path) -> Path:
    """Copy the code engine processes run into `dest`, and return where it is.

    Every process of a session then runs the same code, even if the working tree is
    edited meanwhile: a replacement worker started mid-run must not pick up a half-made
    change (a column its database has not got) and be mistaken for an engine bug.
    """
    root = dest / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCE_PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=ignore, dirs_exist_ok=True)
    return root


def _env(source: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    # A process that hangs is sent SIGABRT: faulthandler then logs where each thread was.
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


class Databases:
    """Throwaway databases on one PostgreSQL server, cloned from a template migrated with
    `streamflow migrate` (run from `source`)."""

    def __init__(self, url: str, source: Path) -> None:
        self.base = make_url(url).set(drivername="postgresql+psycopg")
        self.admin = create_engine(self.base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with self.admin.connect() as conn:
                conn.execute(text("select 1"))
        except Exception as exc:
            self.admin.dispose()
            raise HarnessError(f"PostgreSQL not reachable at {self._safe()}: {exc}") from None
        self.tag = uuid.uuid4().hex[:10]
        self.template = f"chaos_{self.tag}_template"
        self.created: list[str] = []
        self._execute(f'CREATE DATABASE "{self.template}"')
        self.created.append(self.template)
        migrate = subprocess.run(
            [
                sys.executable,
                "-m",
                "streamflow",
                "migrate",
                "--database-url",
                self.url(self.template),
            ],
            cwd=source,
            env=_env(source),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if migrate.returncode != 0:
            raise HarnessError(f"streamflow migrate failed:\n{migrate.stdout}{migrate.stderr}")

    def _safe(self) -> str:
        return self.base.render_as_string(hide_password=True)

    def _execute(self, sql: str, **params: Any) -> Any:
        with self.admin.connect() as conn:
            return conn.execute(text(sql), params)

    def url(self, name: str) -> str:
        return self.base.set(database=name).render_as_string(hide_password=False)

    def create(self, role: str) -> str:
        name = f"chaos_{self.tag}_{role}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return name

    def terminate_connections(self, name: str) -> int:
        """pg_terminate_backend every connection to database `name`; how many there were."""
        with self.admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                ).all()
            )

    def drop(self, name: str) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def close(self, keep: bool = False) -> None:
        try:
            if not keep:
                for name in list(self.created):
                    self.drop(name)
        finally:
            self.admin.dispose()


# -- engine processes --------------------------------------------------------------------


class EngineProcess:
    """One `python -m ...` process, its output in a log file."""

    def __init__(
        self,
        label: str,
        module: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        cwd: Path,
    ) -> None:
        self.label = label
        self.log_path = log_dir / f"{label}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid
        #: True once the harness killed it on purpose.
        self.killed = False
        self._stopping = False

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def has_logged(self, *events: str) -> bool:
        out = self.output()
        return all(f'"event": "{e}"' in out for e in events)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def sigkill(self) -> None:
        self.killed = True
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        """SIGTERM, once: a second one would hit the default handler the engine restores
        while it drains, and kill it."""
        if self.alive and not self._stopping:
            self._stopping = True
            self.popen.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM (unless sent already) and wait; the exit code, or None if it had to be
        killed. A process that does not stop gets SIGABRT first, so faulthandler writes
        every thread's stack to its log."""
        self.stop()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(10)
            return None
        finally:
            self._log.close()

    def close_log(self) -> None:
        if not self._log.closed:
            self._log.close()

    def tail(self, chars: int = 2000) -> str:
        return f"--- {self.label} (pid {self.pid}) ---\n{self.output()[-chars:]}"


# -- one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    role: str
    #: ChaosOptions.workload_key of the run.
    workload_key: tuple[int, int, tuple[str, ...]]
    #: chaos_index -> workflow id
    ids: dict[int, str]
    snapshot: inv.LedgerSnapshot
    performs: list[dict[str, Any]]
    fault_lines: list[dict[str, Any]]
    converge_s: float | None
    settle_s: float | None
    process_faults: list[ProcessFault]
    #: (stream key, entry id) of every entry Redis held undelivered or unacknowledged
    #: when it was killed: faults that put them there went down with it.
    lost_with_redis: set[tuple[str, str]]
    #: Processes that died without being killed on purpose, or exited non-zero on SIGTERM.
    process_problems: list[str]
    dead_pids: list[int]
    log_dir: Path
    stuck: list[str] = field(default_factory=list)

    def summary(self) -> RunSummary:
        return RunSummary(
            role=self.role,
            converge_s=self.converge_s,
            settle_s=self.settle_s,
            performs=sum(1 for p in self.performs if p.get("phase") == "start"),
            passes=self.snapshot.passes,
            log_dir=str(self.log_dir),
        )


class _Run:
    """The processes and servers of one run, and what happened to them."""

    def __init__(
        self,
        options: ChaosOptions,
        dbs: Databases,
        role: str,
        chaos: bool,
        workdir: Path,
        source: Path,
        redis_binary: str,
        say: Progress,
    ) -> None:
        self.options = options
        self.source = source
        self.dbs = dbs
        self.role = role
        self.chaos = chaos
        self.say = say
        self.dir = workdir / role
        self.dir.mkdir(parents=True, exist_ok=True)
        self.perform_log = self.dir / "performs.jsonl"
        self.fault_log = self.dir / "faults.jsonl"
        self.db_name = dbs.create(role)
        self.db_url = dbs.url(self.db_name)
        self.engine: Engine = make_engine(self.db_url, poolclass=NullPool)
        self.redis = RedisServer(redis_binary, self.dir)
        self.procs: list[EngineProcess] = []
        self.process_faults: list[ProcessFault] = []
        self.lost_with_redis: set[tuple[str, str]] = set()
        self.plan = options.plan(self.fault_log) if chaos and options.message_faults else None
        #: Replacement processes not up yet: (process, events it logs when up, deadline).
        self._starting: list[tuple[EngineProcess, tuple[str, ...], float]] = []
        #: When to restart a killed Redis (monotonic), if it is down.
        self._redis_back_at: float | None = None

    # -- processes -----------------------------------------------------------------------

    def env(self, label: str) -> dict[str, str]:
        extra = {
            "STREAMFLOW_DATABASE_URL": self.db_url,
            "STREAMFLOW_REDIS_URL": self.redis.url,
            "STREAMFLOW_STREAM_PREFIX": STREAM_PREFIX,
        }
        if self.plan is not None:
            extra["STREAMFLOW_CHAOS"] = self.plan.for_process(label).to_json()
        return _env(self.source, **extra)

    def spawn(self, label: str, module: str, args: list[str]) -> EngineProcess:
        p = EngineProcess(label, module, args, self.env(label), self.dir, self.source)
        self.procs.append(p)
        return p

    def start_worker(self, label: str) -> EngineProcess:
        o = self.options
        return self.spawn(
            label,
            "streamflow",
            [
                "worker",
                "--app", "chaos.workers",
                "--queues", ",".join(QUEUES),
                "--concurrency", str(o.concurrency),
                "--lease-seconds", str(o.lease_seconds),
                "--drain-seconds", "5",
            ],
        )  # fmt: skip

    def start_consumer(self, label: str) -> EngineProcess:
        o = self.options
        return self.spawn(
            label,
            "streamflow",
            [
                "consume",
                "--reconcile-every", str(o.reconcile_every),
                "--redispatch-after", str(o.redispatch_after),
            ],
        )  # fmt: skip

    def start_all(self) -> None:
        o = self.options
        self.redis.start()
        expected = [(self.start_consumer("consumer"), CONSUMER_STARTED)]
        if o.dropped_after is not None:
            aux = self.spawn(
                "reconciler",
                "chaos",
                [
                    "reconciler",
                    "--every", str(o.reconcile_every),
                    "--dropped-after", str(o.dropped_after),
                    "--redispatch-after", str(o.redispatch_after),
                ],
            )  # fmt: skip
            expected.append((aux, ("reconciler.started",)))
        for i in range(1, o.workers + 1):
            expected.append((self.start_worker(f"worker-{i}"), WORKER_STARTED))
        for p, events in expected:
            self._wait_started(p, events)

    def _wait_started(self, p: EngineProcess, events: tuple[str, ...]) -> None:
        def ready() -> bool:
            if not p.alive:
                raise HarnessError(f"{p.label} exited at start:\n{p.tail()}")
            return p.has_logged(*events)

        try:
            _wait(ready, 60, f"{p.label} to start", interval=0.1)
        except HarnessError:
            raise HarnessError(f"{p.label} did not start:\n{p.tail()}") from None

    def stop_all(self) -> tuple[list[str], list[int]]:
        problems: list[str] = []
        for p in self.procs:
            p.stop()
        for p in self.procs:
            code = p.terminate(timeout=20)
            if p.killed:
                continue
            if code != 0:
                problems.append(f"{p.label} (pid {p.pid}) exited {code}:\n{p.tail(1500)}")
        return problems, [p.pid for p in self.procs]

    # -- the ledger ------------------------------------------------------------------------

    def insert(self, items: list[WorkloadItem]) -> dict[int, str]:
        """The odd-numbered workflows in one transaction, whose commit wakes the
        dispatcher; the even-numbered ones each published by its own insert
        (`publisher=`), its ready messages through this run's faults as any process's
        are (a dropped one is the stale-dispatch sweep's to repair)."""
        ids: dict[int, str] = {}
        with self.engine.begin() as conn:
            for item in items:
                if item.index % 2:
                    ids[item.index] = Workflow.insert(item.workflow, conn).id
        plan = self.plan.for_process("inserter").to_json() if self.plan is not None else None
        publisher = Publisher(
            wrap_for_chaos(connect_streams(self.redis.url), plan), StreamKeys(prefix=STREAM_PREFIX)
        )
        for item in items:
            if not item.index % 2:
                ids[item.index] = Workflow.insert(
                    item.workflow, self.engine, publisher=publisher
                ).id
        return ids

    def progress(self) -> tuple[int, int, int, int]:
        """(terminal steps, all steps, finished workflows, all workflows)."""
        w = t.workflows
        done = w.c.completed_count + w.c.failed_count + w.c.cancelled_count
        finished = func.count().filter(w.c.state == "finished")
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    func.coalesce(func.sum(done), 0),
                    func.coalesce(func.sum(w.c.step_count), 0),
                    finished,
                    func.count(),
                )
            ).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def stuck_steps(self) -> list[str]:
        s = t.steps
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(s.c.workflow_id, s.c.name, s.c.state, s.c.attempt, s.c.dispatched_at)
                .where(s.c.state.not_in(["completed", "failed", "cancelled"]))
                .limit(20)
            ).all()
        return [f"{r.workflow_id} {r.name} {r.state} attempt {r.attempt}" for r in rows]

    # -- process faults ----------------------------------------------------------------------

    def process_fault_plan(self) -> list[tuple[float, str]]:
        o = self.options
        plan: list[tuple[float, str]] = []
        if not self.chaos:
            return plan
        if o.kill_worker:
            plan.append((0.30, "kill-worker"))
        if o.kill_consumer:
            plan.append((0.55, "kill-consumer"))
        if o.cut_postgres:
            plan += [(0.35, "cut-postgres"), (0.65, "cut-postgres")]
        if o.flush_redis:
            plan.append((0.45, "flush-redis"))
        return sorted(plan)

    def fire(self, what: str, fraction: float) -> None:
        """Inject a process fault. A killed process's replacement and a killed Redis's
        restart are left in `self._starting` / `self._redis_back_at` for the loop."""
        now = time.time()
        if what in ("kill-worker", "kill-consumer"):
            role = what.removeprefix("kill-")
            victim = next(p for p in self.procs if p.label.startswith(role) and p.alive)
            victim.sigkill()
            if role == "worker":
                fresh, events = self.start_worker(f"{victim.label}-after-kill"), WORKER_STARTED
            else:
                fresh, events = self.start_consumer(f"{victim.label}-after-kill"), CONSUMER_STARTED
            detail = f"SIGKILL {victim.label} (pid {victim.pid}); started {fresh.label}"
            self.process_faults.append(ProcessFault(what, now, fraction, detail))
            self._starting.append((fresh, events, time.monotonic() + 60))
            return
        if what == "cut-postgres":
            n = self.dbs.terminate_connections(self.db_name)
            detail = f"pg_terminate_backend on {n} ledger connections"
            self.process_faults.append(ProcessFault(what, now, fraction, detail))
            return
        assert what == "flush-redis"
        held = self.redis.unfinished_entries()
        self.redis.kill()
        self.lost_with_redis |= held
        # Kept for diagnosis: which entries the matching may excuse as lost with Redis.
        with (self.dir / "redis-lost.jsonl").open("a") as f:
            f.write(json.dumps({"killed_at": now, "entries": sorted(held)}) + "\n")
        detail = (
            f"SIGKILL redis-server holding {len(held)} unhandled entries; "
            f"restarted empty {REDIS_DOWN_S:.0f} s later"
        )
        self.process_faults.append(ProcessFault(what, now, fraction, detail))
        self._redis_back_at = time.monotonic() + REDIS_DOWN_S

    def _recovering(self) -> bool:
        """Bring back what a process fault took down; True while something is not back.

        Process faults do not overlap: the next one waits until a replacement process is
        up and Redis answers again (an engine process that cannot reach Redis or
        PostgreSQL at start exits, by design).
        """
        if self._redis_back_at is not None and time.monotonic() >= self._redis_back_at:
            self.redis.start()
            self._redis_back_at = None
        for entry in list(self._starting):
            p, events, deadline = entry
            if p.has_logged(*events):
                self._starting.remove(entry)
            elif not p.alive or time.monotonic() > deadline:
                raise HarnessError(f"{p.label} did not start:\n{p.tail()}")
        return self._redis_back_at is not None or bool(self._starting)

    # -- the whole run ---------------------------------------------------------------------

    def execute(self, items: list[WorkloadItem]) -> RunResult:
        o = self.options
        self.start_all()
        self.say(f"[{self.role}] processes up; inserting {describe(items)}")
        ids = self.insert(items)
        started = time.monotonic()
        pending_faults = self.process_fault_plan()
        converge: float | None = None
        deadline = started + o.timeout
        last_note = 0.0
        while time.monotonic() < deadline:
            recovering = self._recovering()
            try:
                done, total, finished, count = self.progress()
            except Exception:  # our own connection cut along with everyone's: look again
                time.sleep(0.1)
                continue
            fraction = done / total if total else 1.0
            if not recovering and pending_faults and pending_faults[0][0] <= fraction:
                _, what = pending_faults.pop(0)
                self.say(f"[{self.role}] {what} at {fraction:.0%}")
                self.fire(what, fraction)
                continue
            if finished == count and not recovering and not pending_faults:
                converge = time.monotonic() - started
                break
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                self.say(f"[{self.role}] {finished}/{count} workflows, {fraction:.0%} of steps")
            time.sleep(0.1)
        if self._redis_back_at is not None:
            self.redis.start()
        stuck = [] if converge is not None else self.stuck_steps()
        if converge is not None:
            self.say(f"[{self.role}] converged in {converge:.1f}s")
        else:
            self.say(f"[{self.role}] did NOT converge within {o.timeout:.0f}s")

        settle = self.settle(started, converge) if self.chaos else converge
        state = self.redis.describe()
        (self.dir / "redis-state.json").write_text(json.dumps(state, indent=1, default=str))
        problems, pids = self.stop_all()
        snapshot = inv.LedgerSnapshot.collect(self.engine)
        return RunResult(
            role=self.role,
            workload_key=o.workload_key,
            ids=ids,
            snapshot=snapshot,
            performs=read_perform_log(self.perform_log),
            fault_lines=read_fault_log(self.fault_log),
            converge_s=converge,
            settle_s=settle,
            process_faults=self.process_faults,
            lost_with_redis=self.lost_with_redis,
            process_problems=problems,
            dead_pids=pids,
            log_dir=self.dir,
            stuck=stuck,
        )

    def settle(self, started: float, converge: float | None) -> float | None:
        """Wait (bounded) until every injected fault is visible in the ledger."""
        if converge is None or self.plan is None:
            return converge
        deadline = time.monotonic() + self.options.settle_seconds()
        while True:
            dead = [p.pid for p in self.procs if not p.alive]
            summary = inv.parse_faults(read_fault_log(self.fault_log), dead)
            try:
                snap = inv.LedgerSnapshot.collect(self.engine, full=False)
            except Exception:
                snap = None
            if snap is not None:
                performs = inv.Performs.of(read_perform_log(self.perform_log))
                matching = inv.match_faults(summary, snap, performs, self.lost_with_redis)
                if matching.complete:
                    settled = time.monotonic() - started
                    self.say(f"[{self.role}] every fault visible after {settled:.1f}s")
                    return settled
            if time.monotonic() > deadline:
                self.say(f"[{self.role}] faults still not all visible; giving up waiting")
                return None
            time.sleep(0.5)

    def close(self, keep: bool) -> None:
        for p in self.procs:
            if p.alive:
                p.sigkill()
            p.close_log()
        self.redis.kill()
        self.engine.dispose()
        if not keep:
            try:
                self.dbs.drop(self.db_name)
            except Exception as exc:  # reported, never hiding the run's own result
                self.say(f"[{self.role}] could not drop {self.db_name}: {exc}")


def execute_run(
    options: ChaosOptions,
    dbs: Databases,
    workdir: Path,
    source: Path,
    *,
    role: str,
    chaos: bool,
    say: Progress,
) -> tuple[RunResult, list[WorkloadItem]]:
    binary = options.redis_server or shutil.which("redis-server")
    if binary is None:
        raise HarnessError("redis-server not found on PATH (pass redis_server=...)")
    run = _Run(options, dbs, role, chaos, workdir, source, binary, say)
    items = build_workload(
        options.workflows,
        options.seed,
        str(run.perform_log),
        attempt_slack=ATTEMPT_SLACK,
        shapes=options.shapes,
    )
    try:
        return run.execute(items), items
    finally:
        run.close(options.keep)


# -- checking ---------------------------------------------------------------------------


def check(
    options: ChaosOptions,
    reference: RunResult,
    chaos: RunResult,
    items: list[WorkloadItem],
) -> Report:
    snap = chaos.snapshot
    performs = inv.Performs.of(chaos.performs)
    summary = inv.parse_faults(chaos.fault_lines, chaos.dead_pids)
    matching = inv.match_faults(summary, snap, performs, chaos.lost_with_redis)
    steps_per = {item.index: item.step_count for item in items}
    converged = inv.InvariantResult(
        "converged",
        "every workflow finished within the deadline",
        chaos.converge_s is not None,
        f"chaos run: {_seconds(chaos.converge_s)}, reference: {_seconds(reference.converge_s)}",
        [] if chaos.converge_s is not None else ["still unfinished:", *chaos.stuck[:7]],
    )
    processes = inv.InvariantResult(
        "processes",
        "engine processes stayed up and stopped cleanly (except those killed on purpose)",
        not chaos.process_problems and not reference.process_problems,
        f"{len(chaos.dead_pids)} chaos-run processes",
        [p.splitlines()[0] for p in chaos.process_problems + reference.process_problems],
    )
    invariants = [
        converged,
        inv.check_perform_once(performs),
        inv.check_results(snap, performs),
        inv.check_dependencies(snap, performs),
        inv.check_same_as_reference(reference.snapshot, snap),
        inv.check_faults_visible(matching),
        inv.check_no_write_lost(snap, chaos.ids, steps_per),
        inv.check_reference_as_designed(
            reference.snapshot, {item.index: item.expected_outcome for item in items}
        ),
        processes,
    ]
    kinds: dict[str, dict[str, int]] = {}
    for f in summary.faults:
        kinds.setdefault(f.kind, {}).setdefault(f.stream, 0)
        kinds[f.kind][f.stream] += 1
    return Report(
        scenario=options.scenario,
        options=options.to_dict(),
        faults_described=options.describe_faults(),
        workload=describe(items),
        reference=reference.summary(),
        chaos=chaos.summary(),
        faults=kinds,
        replays_not_sent=summary.replays_not_sent,
        process_faults=chaos.process_faults,
        repairs=dict(sorted(snap.repair_counts().items())),
        pass_repairs=dict(sorted(snap.pass_repairs.items())),
        evidence=dict(sorted(snap.evidence_counts().items())),
        matching=matching,
        invariants=invariants,
    )


def _seconds(value: float | None) -> str:
    return f"converged in {value:.1f}s" if value is not None else "did not converge"


# -- entry points --------------------------------------------------------------------------


class Session:
    """Databases and a work directory shared by the runs of one invocation."""

    def __init__(self, options: ChaosOptions, say: Progress) -> None:
        self.options = options
        self.say = say
        self.own_dir = options.workdir is None
        self.workdir = Path(options.workdir or tempfile.mkdtemp(prefix="streamflow-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.source = snapshot_source(self.workdir)
        self.dbs = Databases(options.postgres_url, self.source)
        self._runs = 0

    def run(self, options: ChaosOptions, *, chaos: bool) -> tuple[RunResult, list[WorkloadItem]]:
        self._runs += 1
        role = f"{'chaos' if chaos else 'reference'}{self._runs}"
        if chaos:
            self.say(f"[{role}] {options.scenario}: {options.describe_faults()}")
        return execute_run(
            options, self.dbs, self.workdir, self.source, role=role, chaos=chaos, say=self.say
        )

    def close(self, passed: bool) -> None:
        keep = self.options.keep
        self.dbs.close(keep=keep)
        if self.own_dir and passed and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _quiet(_: str) -> None:
    return None


def run_reference(options: ChaosOptions, *, progress: Progress | None = None) -> RunResult:
    """Only the fault-free run of `options`' workload, to share between `run_chaos` calls
    with the same `workflows` and `seed`."""
    session = Session(options, progress or _quiet)
    result: RunResult | None = None
    try:
        result, _ = session.run(replace(options, scenario="reference"), chaos=False)
        return result
    finally:
        ok = result is not None and result.converge_s is not None and not result.process_problems
        session.close(passed=ok)


def run_chaos(
    options: ChaosOptions,
    *,
    reference: RunResult | None = None,
    progress: Progress | None = None,
) -> Report:
    """A reference run (unless one is given) and a chaos run of the same workload,
    checked against every invariant. Raises HarnessError if the harness cannot run."""
    say = progress or _quiet
    if reference is not None and reference.workload_key != options.workload_key:
        raise HarnessError("the reference run given ran a different workload")
    session = Session(options, say)
    report: Report | None = None
    try:
        if reference is None:
            reference, _ = session.run(replace(options, scenario="reference"), chaos=False)
        chaos, items = session.run(options, chaos=True)
        report = check(options, reference, chaos, items)
        report.log_dir = str(session.workdir) if (options.keep or not report.passed) else None
        return report
    finally:
        session.close(passed=report is not None and report.passed)


#: The full matrix: one scenario per fault kind, then everything at once.
MATRIX: tuple[tuple[str, dict[str, Any]], ...] = (
    ("drop-completion", {"drop": 0.3, "streams": ("completion",)}),
    ("drop-ready", {"drop": 0.3, "streams": ("ready",)}),
    ("duplicate", {"dup": 0.3}),
    ("delay", {"delay": 0.3}),
    ("replay", {"replay": 0.3}),
    ("reorder", {"reorder": 0.5}),
    ("headline", {"drop": 0.3, "dup": 0.2}),
    ("kill-worker", {"kill_worker": True, "drop": 0.1, "dup": 0.1}),
    ("kill-consumer", {"kill_consumer": True, "drop": 0.1, "dup": 0.1}),
    ("flush-redis", {"flush_redis": True, "drop": 0.1, "dup": 0.1}),
    ("cut-postgres", {"cut_postgres": True, "drop": 0.1, "dup": 0.1}),
    (
        "everything",
        {
            "drop": 0.2,
            "dup": 0.1,
            "delay": 0.1,
            "replay": 0.1,
            "reorder": 0.2,
            "kill_worker": True,
            "kill_consumer": True,
            "flush_redis": True,
            "cut_postgres": True,
        },
    ),
)


def matrix_options(base: ChaosOptions) -> list[ChaosOptions]:
    """The matrix scenarios on `base`'s workload and engine settings (its own fault
    settings are replaced by each scenario's)."""
    cleared = replace(
        base,
        kill_worker=False,
        kill_consumer=False,
        flush_redis=False,
        cut_postgres=False,
        streams=("completion", "ready"),
        drop=0.0,
        dup=0.0,
        delay=0.0,
        replay=0.0,
        reorder=0.0,
    )
    return [replace(cleared, scenario=name, **changes) for name, changes in MATRIX]


def run_matrix(base: ChaosOptions, *, progress: Progress | None = None) -> list[Report]:
    """Every matrix scenario against one shared reference run of `base`'s workload."""
    say = progress or _quiet
    session = Session(base, say)
    reports: list[Report] = []
    try:
        reference, _ = session.run(replace(base, scenario="reference"), chaos=False)
        for options in matrix_options(base):
            chaos, items = session.run(options, chaos=True)
            report = check(options, reference, chaos, items)
            say(f"[{options.scenario}] {'PASS' if report.passed else 'FAIL'}")
            reports.append(report)
        return reports
    finally:
        passed = bool(reports) and all(r.passed for r in reports)
        if not passed or base.keep:
            for r in reports:
                r.log_dir = str(session.workdir)
        session.close(passed=passed)
