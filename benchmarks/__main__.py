"""The benchmark suite: Streamflow side by side with Celery, DBOS and the hardware.

    python -m benchmarks --all                 # the full suite (tens of minutes)
    python -m benchmarks --quick               # every workload, tiny, one repeat (~1 min)
    python -m benchmarks --quick --only w1,w3 --systems streamflow,celery --out /tmp/b

Writes DIR/results.json, DIR/results.md and DIR/results.png (default DIR
benchmarks/results/latest). Methodology and figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import physical, report, targets
from benchmarks.figures import add_ratios, aggregate, run_figures
from benchmarks.servers import DEFAULT_PG, Postgres, disposable_redis
from benchmarks.systems.base import BenchError, Ctx, System, measure
from benchmarks.workloads import Sizes, Workload, workloads

SYSTEMS = ("streamflow", "celery", "dbos")
WORKLOADS = ("w1", "w2", "w3", "w4")
FULL = Sizes(w1=500, w2=100, w3=200, w4_seconds=15, repeats=3)
QUICK = Sizes(w1=30, w2=6, w3=20, w4_seconds=1.5, repeats=1)

NOTES = [
    "- **steps/s, workflows/s**: steps (workflows) ÷ (last workflow's finish - first "
    "submission). W1/W2 submit every workflow at once (closed burst), so their latencies "
    "are mostly queueing; W4 is the latency test.",
    "- **latency**: per workflow, finish - intended submission time (W4 schedules each "
    "arrival at a fixed time and measures from it, so a late submitter cannot hide queueing: "
    "no coordinated omission). Finish is the workflow's `finished_at` in the ledger for "
    "Streamflow (the recording transaction, just before its commit) and the last step "
    "body's end for the peers (before they record it) — a small edge to the peers.",
    "- **hop**: per DAG edge, child step body start - parent step body end, for every "
    "system (the same clock, the same timing file): everything the engine does between "
    "two steps, recording the parent included.",
    "- **PG commits/step**: `pg_stat_database.xact_commit` delta of the system's own "
    "scratch database ÷ steps, read after its processes exited (backends flush on exit). "
    "It includes submitting the workflows (Streamflow: one insert transaction per "
    "workflow; DBOS: its enqueue writes and result polling), but not the harness's own "
    "completion polls, which are counted and subtracted. Celery uses no PostgreSQL.",
    "- **Redis cmds/step**: `total_commands_processed` delta of the suite's own "
    "redis-server (started for this run, no persistence) ÷ steps, client commands included.",
    "- **CPU s/1k steps**: user+system CPU of the system's process tree (Streamflow: its "
    "worker and consume processes; Celery: the prefork worker and its children; DBOS: its "
    "one process, which also submits), of the PostgreSQL backends serving the system's "
    "database (WAL writer, checkpointer and other shared server processes are not "
    "counted), and of the suite's redis-server; sampled every 0.2 s from the moment the "
    "system was ready.",
    "- **peak RSS**: the largest sum of RSS over the system's process tree during the run.",
    "- **x best other**: median steps/s ÷ the best median of the other systems. "
    "**x pgbench TPS**: median steps/s ÷ `pgbench -N` TPS at the same client count.",
    "- Every run checks the results it got back (each last step returns a number that "
    "depends on every step before it): *wrong results* must be 0.",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Streamflow vs Celery and DBOS vs the hardware: one run, one table.",
        epilog="Example: python -m benchmarks --quick --out /tmp/bench",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="The full suite (the default).")
    mode.add_argument("--quick", action="store_true", help="Tiny sizes, 1 repeat (CI).")
    p.add_argument("--out", default="benchmarks/results/latest", help="Output directory.")
    p.add_argument("--repeats", type=int, default=None, help="Repeats per (system, workload).")
    p.add_argument("--only", default=",".join(WORKLOADS), help="Workloads, e.g. w1,w3.")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="e.g. streamflow,celery.")
    p.add_argument("--concurrency", type=int, default=4, help="Workers per system.")
    p.add_argument(
        "--soak-steps",
        type=int,
        default=None,
        help="Steps in the Streamflow RSS soak (default 100000; quick 300; 0: skip).",
    )
    p.add_argument(
        "--reconciler-sizes",
        default=None,
        help="Ledger sizes for reconciler scaling (default 100000,1000000; "
        "quick 2000,10000; empty: skip).",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("STREAMFLOW_TEST_POSTGRES_URL", DEFAULT_PG),
        help="A PostgreSQL server where scratch databases can be made.",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="Use this Redis instead of starting one (its command counts then "
        "include anyone else's traffic).",
    )
    p.add_argument(
        "--render",
        metavar="DIR",
        default=None,
        help="Only rewrite DIR/results.md and results.png from DIR/results.json.",
    )
    args = p.parse_args(argv)
    for name, allowed in (("only", WORKLOADS), ("systems", SYSTEMS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        bad = sorted(set(chosen) - set(allowed))
        if bad or not chosen:
            p.error(
                f"--{name}: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
            )
        setattr(args, name, chosen)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _make(name: str, ctx: Ctx) -> System:
    if name == "streamflow":
        from benchmarks.systems.streamflow import StreamflowSystem

        return StreamflowSystem(ctx)
    if name == "celery":
        from benchmarks.systems.celery import CelerySystem

        return CelerySystem(ctx)
    from benchmarks.systems.dbos import DbosSystem

    return DbosSystem(ctx)


def _samples(runs: list[Any]) -> dict[str, list[float]]:
    return {
        "latencies_ms": [round(v, 2) for r in runs for v in r.outcome.latencies_ms],
        "hops_ms": [round(v, 2) for r in runs for v in r.outcome.hops_ms],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C: scratch databases dropped, child processes stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.render:
        return render(Path(args.render))
    quick = bool(args.quick)
    sizes = QUICK if quick else FULL
    repeats = args.repeats or sizes.repeats
    soak_steps = args.soak_steps if args.soak_steps is not None else (300 if quick else 100_000)
    rec_default = "2000,10000" if quick else "100000,1000000"
    rec_sizes = [
        int(s)
        for s in (
            args.reconciler_sizes if args.reconciler_sizes is not None else rec_default
        ).split(",")
        if s.strip()
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    started = datetime.now(UTC)
    git = _git()  # now: others may commit while the suite runs
    base = [w for w in workloads(sizes) if w.key in args.only]
    # W4 needs W1's maximum: measure W1 even if only W4 was asked for
    if "w4" in args.only and not any(w.key == "w1" for w in base):
        base.insert(0, workloads(sizes)[0])
    w4_loads = (0.5, 0.8) if "w4" in args.only else ()
    total = (
        1
        + len(args.systems) * repeats * (len(base) + len(w4_loads))
        + (1 if rec_sizes else 0)
        + (1 if soak_steps and "streamflow" in args.systems else 0)
    )
    pg = Postgres(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    results: dict[str, Any] = {"systems": {}, "workload_titles": {}, "samples": {}}
    runs: dict[tuple[str, str], list[Any]] = {}
    failures: list[str] = []
    progress = Progress(
        TextColumn("[bold]{task.description:<44}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    try:
        with disposable_redis(args.redis_url) as redis, progress:
            task = progress.add_task("physical limits", total=total)
            ctx = Ctx(
                pg,
                args.database_url,
                redis,
                workdir,
                concurrency=args.concurrency,
                settle_seconds=0.0 if quick else 1.1,
            )
            phys_seconds = 1.0 if quick else 10.0
            phys_runs = [
                physical.measure_all(
                    pg, redis, args.concurrency, phys_seconds, 5_000 if quick else 100_000
                )
                for _ in range(1 if quick else repeats)
            ]
            results["physical"] = {"runs": phys_runs, "median": _physical_medians(phys_runs)}
            progress.advance(task)
            systems = {name: _make(name, ctx) for name in args.systems}
            for s in systems.values():
                s.setup()
            try:

                def run(s: System, w: Workload, r: int) -> None:
                    progress.update(task, description=f"{s.name}: {w.key} (repeat {r + 1})")
                    try:
                        fig = measure(s, w, workdir / s.name / f"{w.key}-{r}")
                        runs.setdefault((s.name, w.key), []).append(fig)
                    except BenchError as exc:
                        failures.append(f"{s.name} {w.key} repeat {r + 1}: {exc}"[:600])
                        console.print(f"[red]{s.name} {w.key} failed:[/] {str(exc)[:300]}")
                    results["workload_titles"][w.key] = w.title
                    progress.advance(task)

                for r in range(repeats):
                    for s in systems.values():
                        for w in base:
                            run(s, w, r)
                open_loop = _open_loop(systems, runs, w4_loads, sizes, base)
                for r in range(repeats):
                    for s in systems.values():
                        for w in open_loop.get(s.name, []):
                            run(s, w, r)
                if soak_steps and "streamflow" in systems:
                    progress.update(task, description=f"streamflow: RSS soak {soak_steps:,} steps")
                    results["rss_soak"] = _soak(systems["streamflow"], soak_steps, workdir)
                    progress.advance(task)
            finally:
                for s in systems.values():
                    s.teardown()
            if rec_sizes:
                progress.update(task, description=f"reconciler scaling {rec_sizes}")
                results["reconciler_scaling"] = _reconciler(args.database_url, rec_sizes, repeats)
                progress.advance(task)
            for name, s in systems.items():
                entry: dict[str, Any] = {
                    "version": s.version(),
                    "durability": s.durability,
                    "workloads": {},
                }
                results["systems"][name] = entry
                results["samples"][name] = {}
                for (sys_name, wkey), rs in runs.items():
                    if sys_name != name:
                        continue
                    per_run = [run_figures(x) for x in rs]
                    entry["workloads"][wkey] = {"figures": aggregate(per_run), "runs": per_run}
                    results["samples"][name][wkey] = _samples(rs)
    finally:
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)
    _order_titles(results)
    add_ratios(
        results["systems"], (results["physical"]["median"].get("pgbench_tps") or {}).get("median")
    )
    results["meta"] = _meta(args, quick, repeats, started, failures) | {"git": git}
    results["notes"] = NOTES
    results["targets"] = targets.evaluate(results)
    report.write_json(results, out)
    report.write_markdown(results, out)
    report.write_plot(results, out)
    console.print(f"wrote {out}/results.json, results.md, results.png")
    for t in results["targets"]:
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[t["met"]]
        console.print(f"  {mark} {t['target']}: {t['gap']}")
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed[/]; see results.json meta.failures")
        return 1
    return 0


def render(out: Path) -> int:
    import json

    source = out / "results.json"
    if not source.exists():
        print(f"no results.json in {out}", file=sys.stderr)
        return 2
    results = json.loads(source.read_text())
    report.write_markdown(results, out)
    report.write_plot(results, out)
    print(f"wrote {out}/results.md, results.png", file=sys.stderr)
    return 0


def _physical_medians(phys_runs: list[dict[str, Any]]) -> dict[str, Any]:
    from benchmarks.stats import spread

    def pick(path: tuple[str, str]) -> dict[str, Any]:
        return spread([r[path[0]].get(path[1]) for r in phys_runs])

    return {
        "pgbench_tps": pick(("pgbench", "tps")),
        "insert_tps": pick(("pg_insert", "tps")),
        "insert_p99_ms": pick(("pg_insert", "p99_ms")),
        "redis_xadd_rps": pick(("redis_xadd", "rps")),
        "redis_rt_p50_ms": pick(("redis_round_trip", "p50_ms")),
        "redis_rt_p99_ms": pick(("redis_round_trip", "p99_ms")),
    }


def _open_loop(
    systems: dict[str, System],
    runs: dict[tuple[str, str], list[Any]],
    loads: tuple[float, ...],
    sizes: Sizes,
    base: list[Workload],
) -> dict[str, list[Workload]]:
    """W4 per system: arrivals at each load x that system's own median W1 workflows/s."""
    w1 = next((w for w in base if w.key == "w1"), None)
    if w1 is None:  # W4 not asked for
        return {}
    plan: dict[str, list[Workload]] = {}
    for name in systems:
        done = runs.get((name, "w1"), [])
        if not done or not loads:
            continue
        max_rate = statistics.median(r.outcome.workflows / r.outcome.wall_s for r in done)
        plan[name] = [
            w1.at_rate(f"w4@{load:.0%}", max_rate * load, load, sizes.w4_seconds) for load in loads
        ]
    return plan


def _soak(system: System, steps: int, workdir: Path) -> dict[str, Any]:
    """Streamflow only: one long burst of 3-step chains; RSS after the first tenth vs at
    the end (the first tenth is warm-up: pools, caches, imports)."""
    # Whole chains of 3, at least `steps` of them (100,000 asked: 100,002 run, not 99,999).
    w = Workload("soak", f"RSS soak {steps:,} steps", "chain", 3, max(1, -(-steps // 3)))
    # The per-run deadline suits the workloads; a soak of 100,000 steps on a slow machine
    # needs longer. Allow it down to 20 steps/s before calling it stuck.
    saved = system.ctx.timeout
    system.ctx.timeout = max(saved, steps / 20)
    try:
        fig = measure(system, w, workdir / "soak")
    finally:
        system.ctx.timeout = saved
    series = fig.rss_series
    tenth = max(1, len(series) // 10)
    start = statistics.median(series[tenth : 2 * tenth] or series[:1]) if series else 0
    end = statistics.median(series[-tenth:]) if series else 0
    return {
        "steps": w.steps,
        "steps_per_s": w.steps / fig.outcome.wall_s,
        "rss_start_mb": start / 2**20,
        "rss_end_mb": end / 2**20,
        "growth": (end - start) / start if start else None,
        "samples": len(series),
        "wrong_results": fig.outcome.wrong_results,
    }


def _reconciler(url: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    from dataclasses import asdict

    from benchmarks import reconciler_scaling

    timings = reconciler_scaling.run(url, sizes, 0.01, repeats)
    return {
        "timings": [
            asdict(t) | {"median_ms": t.median_ms, "spread_ms": t.spread_ms} for t in timings
        ],
        "table": reconciler_scaling.report(timings),
    }


def _order_titles(results: dict[str, Any]) -> None:
    titles = results["workload_titles"]
    results["workload_titles"] = {k: titles[k] for k in sorted(titles)}


def _meta(
    args: argparse.Namespace, quick: bool, repeats: int, started: datetime, failures: list[str]
) -> dict[str, Any]:
    import psycopg
    import redis as redis_py

    pg_version = "PostgreSQL ?"
    try:
        with psycopg.connect(Postgres(args.database_url).dsn("postgres")) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = f"PostgreSQL {row[0]}" if row else pg_version
    except psycopg.Error:
        pass
    redis_version = shutil.which("redis-server") or "?"
    try:
        import subprocess

        redis_version = (
            subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, timeout=10
            )
            .stdout.split()[2]
            .split("=")[-1]
        )
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {
        "mode": "quick" if quick else "all",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:])
        if argv_is_cli()
        else "python -m benchmarks (from code)",
        "repeats": repeats,
        "concurrency": args.concurrency,
        "systems": args.systems,
        "workloads": args.only,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": pg_version,
            "redis": redis_version,
            "redis_py": redis_py.__version__,
        },
        "note": os.environ.get("BENCH_NOTE", ""),
        "git": _git(),
        "failures": failures,
        "elapsed_s": round(time.time() - started.timestamp(), 1),
    }


def _git() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it (others' work
    in progress is measured too when it did)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "streamflow", "ledger"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "uncommitted_engine_files": [d[3:] for d in dirty if d.strip()]}


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name in ("__main__.py", "benchmarks")


if __name__ == "__main__":
    raise SystemExit(main())
