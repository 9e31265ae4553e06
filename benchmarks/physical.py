"""What PostgreSQL and Redis can do at all on this machine, measured in the same run:
the ceilings the workload figures are compared with.

- `pgbench -N` (TPC-B-like without the contended branch/teller updates: per transaction
  one UPDATE, one SELECT, one INSERT) at the workers' client count, in a scratch database.
- A single-row INSERT transaction shaped like a ledger row (an attempt row: text ids,
  integers, a JSONB payload, a timestamp), autocommit, from the same number of threads.
- `redis-benchmark` XADD requests/s against the suite's Redis.
- A redis-py round trip XADD -> XREADGROUP -> XACK, one at a time: p50/p99.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import threading
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy.engine import make_url

from benchmarks.servers import Postgres, RedisServer
from benchmarks.stats import percentile


def _pg_env_args(pg: Postgres, database: str) -> list[str]:
    url = make_url(pg.dsn(database))
    args = ["-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    if url.username:
        args += ["-U", url.username]
    return [*args, database]


def pgbench_tps(pg: Postgres, clients: int, seconds: float) -> dict[str, Any]:
    """TPS of `pgbench -N` (excluding connection time) at `clients` clients."""
    if shutil.which("pgbench") is None:
        return {"tps": None, "error": "pgbench is not installed"}
    database = pg.create_database("bench_pgbench")
    try:
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", *_pg_env_args(pg, database)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        run = subprocess.run(
            [
                "pgbench",
                "-N",
                "-n",
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-T",
                str(max(1, round(seconds))),
                *_pg_env_args(pg, database),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", run.stdout)
        latency = re.search(r"latency average = ([0-9.]+) ms", run.stdout)
        return {
            "tps": float(match.group(1)) if match else None,
            "latency_avg_ms": float(latency.group(1)) if latency else None,
            "clients": clients,
        }
    finally:
        pg.drop_database(database)


_LEDGER_ROW = """CREATE TABLE bench_attempts (
    workflow_id varchar(32) NOT NULL, step varchar(200) NOT NULL, attempt integer NOT NULL,
    status varchar(16) NOT NULL, payload jsonb, source varchar(40) NOT NULL,
    recorded_at timestamptz NOT NULL, PRIMARY KEY (workflow_id, step, attempt))"""


def insert_tps(pg: Postgres, clients: int, seconds: float) -> dict[str, Any]:
    """Single-row INSERT transactions (autocommit) from `clients` threads: TPS and the
    per-transaction p50/p99."""
    database = pg.create_database("bench_insert")
    try:
        with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
            conn.execute(_LEDGER_ROW)
        latencies: list[list[float]] = [[] for _ in range(clients)]
        start = threading.Barrier(clients + 1)
        stop_at: list[float] = [0.0]

        def run(k: int) -> None:
            with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
                conn.execute("SELECT 1")
                start.wait()
                n = 0
                while time.perf_counter() < stop_at[0]:
                    t0 = time.perf_counter()
                    conn.execute(
                        "INSERT INTO bench_attempts VALUES (%s, %s, 1, 'completed', %s, "
                        "'worker', now())",
                        (f"{k:08x}{n:024x}", f"s{n % 3}", Jsonb({"value": n})),
                    )
                    latencies[k].append((time.perf_counter() - t0) * 1000)
                    n += 1

        threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        start.wait()
        for t in threads:
            t.join(seconds + 30)
        flat = [x for per in latencies for x in per]
        return {
            "tps": len(flat) / seconds,
            "p50_ms": percentile(flat, 50),
            "p99_ms": percentile(flat, 99),
            "clients": clients,
        }
    finally:
        pg.drop_database(database)


def redis_xadd_rps(redis: RedisServer, requests: int) -> dict[str, Any]:
    """`redis-benchmark -n N XADD key * f v` (50 clients, its default) on db 15."""
    if shutil.which("redis-benchmark") is None:
        return {"rps": None, "error": "redis-benchmark is not installed"}
    url = make_url(redis.url)
    key = "bench:xadd"
    run = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 6379),
            "--dbnum",
            "15",
            "--csv",
            "-n",
            str(requests),
            "XADD",
            key,
            "*",
            "f",
            "v",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    redis.client(15).delete(key)
    if not rows:
        return {"rps": None, "error": run.stdout[-200:]}
    return {
        "rps": float(rows[-1]["rps"]),
        "p50_ms": float(rows[-1]["p50_latency_ms"]),
        "p99_ms": float(rows[-1]["p99_latency_ms"]),
        "clients": 50,
    }


def redis_round_trip(redis: RedisServer, count: int) -> dict[str, Any]:
    """XADD -> XREADGROUP -> XACK from redis-py, one message at a time."""
    client = redis.client(15)
    key, group = "bench:rt", "g"
    client.delete(key)
    client.xgroup_create(key, group, id="0", mkstream=True)
    samples: list[float] = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            client.xadd(key, {"f": "v"})
            got = client.xreadgroup(group, "c", {key: ">"}, count=1)
            entry_id = got[0][1][0][0]
            client.xack(key, group, entry_id)
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        client.delete(key)
        client.close()
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "n": count}


def measure_all(
    pg: Postgres, redis: RedisServer, clients: int, seconds: float, redis_requests: int
) -> dict[str, Any]:
    return {
        "pgbench": pgbench_tps(pg, clients, seconds),
        "pg_insert": insert_tps(pg, clients, seconds),
        "redis_xadd": redis_xadd_rps(redis, redis_requests),
        "redis_round_trip": redis_round_trip(redis, max(200, redis_requests // 20)),
    }
