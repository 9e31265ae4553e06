"""How a reconciler pass scales with the size of the ledger.

Builds ledgers of finished workflows (10 steps each, chains, with attempts, results and
consumed-event evidence, as a real ledger would hold) on a throwaway PostgreSQL database,
then times reconciler passes: with nothing to repair, and with a share of steps broken in
the four ways the reconciler repairs from the ledger alone (expired leases, lost ready
messages, dropped completion events, releases not applied). Prints medians and spreads
per size and the growth ratios; writes a JSON file.

    python -m benchmarks.reconciler_scaling                      # 100k and 1M steps
    python -m benchmarks.reconciler_scaling --sizes 10000 --repeats 3   # quick

Same machine, same run, same code for every size: only the ledger's size changes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from ledger.db import make_engine
from ledger.migrate import upgrade
from streamflow.reconciler import Reconciler, ReconcilerConfig
from streamflow.streams.keys import StreamKeys

STEPS_PER_WORKFLOW = 10
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Timing:
    steps: int
    scenario: str
    repairs_expected: int
    runs_ms: list[float] = field(default_factory=list)
    repairs_found: list[int] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def spread_ms(self) -> float:
        return max(self.runs_ms) - min(self.runs_ms)


def _load(engine: Engine, steps: int) -> None:
    """Bulk-load `steps` finished steps in SQL (generate_series), then ANALYZE."""
    workflows = steps // STEPS_PER_WORKFLOW
    wid = "lpad(to_hex(w), 32, '0')"
    old = "now() - interval '2 days'"
    statements = [
        f"""INSERT INTO streamflow_workflows (id, name, state, outcome, semantics_version,
            context, step_count, completed_count, needs_review, created_at, updated_at,
            finished_at)
            SELECT {wid}, 'bench', 'finished', 'completed', 2, '{{}}'::jsonb,
                   {STEPS_PER_WORKFLOW}, {STEPS_PER_WORKFLOW}, false, {old}, {old}, {old}
            FROM generate_series(1, {workflows}) w""",
        f"""INSERT INTO streamflow_steps (workflow_id, name, position, worker, queue, args,
            max_attempts, priority, state, attempt, needs_review, terminal_cause,
            available_at, dispatched_at, created_at, updated_at, finished_at)
            SELECT {wid}, 's' || i, i, 'bench:Step', 'default', '{{}}'::jsonb, 3, 0,
                   'completed', 1, false, 'completed', {old}, {old}, {old}, {old}, {old}
            FROM generate_series(1, {workflows}) w, generate_series(0, 9) i""",
        f"""INSERT INTO streamflow_edges (workflow_id, child, parent, policy)
            SELECT {wid}, 's' || i, 's' || (i - 1), 'cancel'
            FROM generate_series(1, {workflows}) w, generate_series(1, 9) i""",
        f"""INSERT INTO streamflow_attempts (workflow_id, step, attempt, status, payload,
            source, recorded_at)
            SELECT {wid}, 's' || i, 1, 'completed', '1'::jsonb, 'worker', {old}
            FROM generate_series(1, {workflows}) w, generate_series(0, 9) i""",
        f"""INSERT INTO streamflow_results (workflow_id, step, attempt, payload, recorded_at)
            SELECT {wid}, 's' || i, 1, '1'::jsonb, {old}
            FROM generate_series(1, {workflows}) w, generate_series(0, 9) i""",
        f"""INSERT INTO streamflow_evidence (workflow_id, step, kind, classification, source,
            status, attempt, dedupe_key, created_at)
            SELECT {wid}, 's' || i, 'event', 'consumed', 'consumer', 'completed', 1,
                   {wid} || '\\:s' || i || '\\:1\\:completed', {old}
            FROM generate_series(1, {workflows}) w, generate_series(0, 9) i""",
    ]
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


def _break(engine: Engine, steps: int, share: float) -> int:
    """Break `share` of the steps (the last step of that many workflows), a quarter in
    each way the reconciler repairs. Returns how many repairs are owed."""
    broken = max(4, int(steps * share))
    per_kind = broken // 4
    wid = "lpad(to_hex(w), 32, '0')"
    ranges = [(1 + k * per_kind, (k + 1) * per_kind) for k in range(4)]
    running = """UPDATE streamflow_workflows SET state = 'running', outcome = NULL,
                 finished_at = NULL, completed_count = 9, {counter} = 1
                 WHERE id IN (SELECT {wid} FROM generate_series({a}, {b}) w)"""
    forget = [
        "DELETE FROM streamflow_results WHERE step = 's9' AND workflow_id IN "
        "(SELECT {wid} FROM generate_series({a}, {b}) w)",
        "DELETE FROM streamflow_attempts WHERE step = 's9' AND workflow_id IN "
        "(SELECT {wid} FROM generate_series({a}, {b}) w)",
        "DELETE FROM streamflow_evidence WHERE step = 's9' AND workflow_id IN "
        "(SELECT {wid} FROM generate_series({a}, {b}) w)",
    ]
    in_range = "workflow_id IN (SELECT {wid} FROM generate_series({a}, {b}) w)"
    with engine.begin() as conn:
        # 1. a worker died holding a lease that expired long ago
        a, b = ranges[0]
        for sql in forget:
            conn.execute(text(sql.format(wid=wid, a=a, b=b)))
        conn.execute(text(running.format(counter="executing_count", wid=wid, a=a, b=b)))
        conn.execute(
            text(
                "UPDATE streamflow_steps SET state = 'executing', terminal_cause = NULL, "
                "finished_at = NULL, lease_owner = 'dead', "
                "lease_expires_at = now() - interval '1 hour' "
                f"WHERE name = 's9' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
        # 2. a ready message was lost: available, dispatched an hour ago, never claimed
        a, b = ranges[1]
        for sql in forget:
            conn.execute(text(sql.format(wid=wid, a=a, b=b)))
        conn.execute(text(running.format(counter="available_count", wid=wid, a=a, b=b)))
        conn.execute(
            text(
                "UPDATE streamflow_steps SET state = 'available', terminal_cause = NULL, "
                "finished_at = NULL, attempt = 0, dispatched_at = now() - interval '1 hour' "
                f"WHERE name = 's9' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
        # 3. a worker's completion event was never consumed (recorded 45 s ago)
        a, b = ranges[2]
        conn.execute(
            text(
                "UPDATE streamflow_attempts SET recorded_at = now() - interval '45 seconds' "
                f"WHERE step = 's9' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
        conn.execute(
            text(
                "DELETE FROM streamflow_evidence "
                f"WHERE step = 's9' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
        # 4. s8 finished 30 s ago but the release of s9 was never applied
        a, b = ranges[3]
        for sql in forget:
            conn.execute(text(sql.format(wid=wid, a=a, b=b)))
        conn.execute(text(running.format(counter="pending_count", wid=wid, a=a, b=b)))
        conn.execute(
            text(
                "UPDATE streamflow_steps SET state = 'pending', terminal_cause = NULL, "
                "finished_at = NULL, attempt = 0, available_at = NULL, dispatched_at = NULL "
                f"WHERE name = 's9' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
        conn.execute(
            text(
                "UPDATE streamflow_steps SET finished_at = now() - interval '30 seconds' "
                f"WHERE name = 's8' AND {in_range.format(wid=wid, a=a, b=b)}"
            )
        )
    return per_kind * 4


def _reconciler(engine: Engine) -> Reconciler:
    # Dropped events are looked for 30 s back (dropped_after); the last pass is "now".
    return Reconciler(engine, None, StreamKeys(), ReconcilerConfig(), host="bench")


def _mark_recent_pass(engine: Engine) -> None:
    """Record a finished pass that started 2 minutes ago, as a reconciler running every
    few seconds would have: the next pass looks at what changed since."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO streamflow_reconciler_passes (host, started_at, finished_at, summary) "
                "VALUES ('bench', now() - interval '2 minutes', now() - interval '2 minutes', "
                "'{}'::jsonb)"
            )
        )


def _measure(engine: Engine, steps: int, share: float, repeats: int) -> list[Timing]:
    clean = Timing(steps, "nothing to repair", 0)
    for _ in range(repeats):
        _mark_recent_pass(engine)
        t0 = time.perf_counter()
        summary = _reconciler(engine).run_pass()
        clean.runs_ms.append((time.perf_counter() - t0) * 1000)
        clean.repairs_found.append(summary.total)
    broken = Timing(steps, f"{share:.0%} to repair", 0)
    for _ in range(repeats):
        with engine.begin() as conn:  # back to a clean finished ledger, then break it
            conn.execute(text("TRUNCATE streamflow_recoveries, streamflow_reconciler_passes"))
        broken.repairs_expected = _break(engine, steps, share)
        _mark_recent_pass(engine)
        t0 = time.perf_counter()
        summary = _reconciler(engine).run_pass()
        broken.runs_ms.append((time.perf_counter() - t0) * 1000)
        broken.repairs_found.append(summary.total)
        _restore(engine, steps)
    return [clean, broken]


def _restore(engine: Engine, steps: int) -> None:
    """Rebuild the finished ledger for the next repeat (faster than repairing it back)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE streamflow_workflows, streamflow_steps, streamflow_edges, "
                "streamflow_attempts, streamflow_results, streamflow_evidence, "
                "streamflow_recoveries, streamflow_reconciler_passes CASCADE"
            )
        )
    _load(engine, steps)


def run(admin_url: str, sizes: list[int], share: float, repeats: int) -> list[Timing]:
    base = make_url(admin_url).set(drivername="postgresql+psycopg")
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    timings: list[Timing] = []
    for steps in sizes:
        name = f"streamflow_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = make_engine(base.set(database=name).render_as_string(hide_password=False))
        try:
            upgrade(engine)
            print(f"loading {steps:,} steps ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            _load(engine, steps)
            print(
                f"  loaded in {time.perf_counter() - t0:.1f} s; timing passes",
                file=sys.stderr,
                flush=True,
            )
            timings.extend(_measure(engine, steps, share, repeats))
        finally:
            engine.dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    return timings


def report(timings: list[Timing]) -> str:
    lines = [
        "| steps | scenario | repairs owed | repairs made | median ms | spread ms | runs |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        lines.append(
            f"| {t.steps:,} | {t.scenario} | {t.repairs_expected:,} | "
            f"{statistics.median(t.repairs_found):,.0f} | {t.median_ms:.1f} | "
            f"{t.spread_ms:.1f} | {len(t.runs_ms)} |"
        )
    lines.append(
        "\nOne pass repairs at most `batch` (1,000) findings of each kind; the rest wait for "
        "the next pass, so a pass stays bounded however much is broken."
    )
    by_scenario: dict[str, list[Timing]] = {}
    for t in timings:
        by_scenario.setdefault(t.scenario, []).append(t)
    for scenario, ts in by_scenario.items():
        ts.sort(key=lambda t: t.steps)
        for small, big in itertools.pairwise(ts):
            lines.append(
                f"\n{scenario}: {big.steps:,} vs {small.steps:,} steps "
                f"({big.steps / small.steps:.0f}x the ledger): "
                f"{big.median_ms / small.median_ms:.2f}x the time"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="100000,1000000",
        help="Comma-separated ledger sizes in steps (default 100000,1000000).",
    )
    parser.add_argument("--repair-share", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STREAMFLOW_TEST_POSTGRES_URL", DEFAULT_URL),
        help="A PostgreSQL server where a throwaway database can be made.",
    )
    parser.add_argument("--out", default="benchmarks/results/reconciler_scaling.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    timings = run(args.database_url, sizes, args.repair_share, args.repeats)
    table = report(timings)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "measured_at": datetime.now(UTC).isoformat(),
                "timings": [
                    asdict(t) | {"median_ms": t.median_ms, "spread_ms": t.spread_ms}
                    for t in timings
                ],
                "table": table,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
