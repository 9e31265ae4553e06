"""From measured runs to the figures the table shows, and medians over repeats."""

from __future__ import annotations

from typing import Any

from benchmarks.stats import spread, summary
from benchmarks.systems.base import RunFigures

#: Every figure each system has for each workload (None where it does not apply, e.g.
#: Redis commands for DBOS, which does not use Redis).
FIGURE_KEYS = (
    "steps_per_s",
    "workflows_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "hop_p50_ms",
    "hop_p95_ms",
    "hop_p99_ms",
    "pg_commits_per_step",
    "redis_commands_per_step",
    "cpu_s_per_1k_steps_system",
    "cpu_s_per_1k_steps_postgres",
    "cpu_s_per_1k_steps_redis",
    "peak_worker_rss_mb",
    "ratio_vs_best_peer",
    "ratio_vs_pgbench",
    "max_submit_lag_ms",
    "wrong_results",
)


def run_figures(run: RunFigures) -> dict[str, float | None]:
    o = run.outcome
    lat = summary(o.latencies_ms)
    hop = summary(o.hops_ms)
    per_k = 1000 / o.steps
    return {
        "steps_per_s": o.steps / o.wall_s,
        "workflows_per_s": o.workflows / o.wall_s,
        "latency_p50_ms": lat["p50"],
        "latency_p95_ms": lat["p95"],
        "latency_p99_ms": lat["p99"],
        "hop_p50_ms": hop["p50"],
        "hop_p95_ms": hop["p95"],
        "hop_p99_ms": hop["p99"],
        "pg_commits_per_step": None if run.pg_commits is None else run.pg_commits / o.steps,
        "redis_commands_per_step": (
            None if run.redis_commands is None else run.redis_commands / o.steps
        ),
        "cpu_s_per_1k_steps_system": run.cpu_s.get("system", 0.0) * per_k,
        "cpu_s_per_1k_steps_postgres": (
            run.cpu_s["postgres"] * per_k if "postgres" in run.cpu_s else None
        ),
        "cpu_s_per_1k_steps_redis": run.cpu_s["redis"] * per_k if "redis" in run.cpu_s else None,
        "peak_worker_rss_mb": run.peak_rss_bytes / 2**20,
        "ratio_vs_best_peer": None,  # filled once every system has run
        "ratio_vs_pgbench": None,
        "max_submit_lag_ms": o.max_submit_lag_ms,
        "wrong_results": float(o.wrong_results),
    }


def aggregate(runs: list[dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    return {key: spread([r.get(key) for r in runs]) for key in FIGURE_KEYS}


def add_ratios(systems: dict[str, Any], pgbench_tps: float | None) -> None:
    """ratio_vs_best_peer: a system's median steps/s ÷ the best median among the *other*
    systems; ratio_vs_pgbench: median steps/s ÷ pgbench -N TPS at the same client count."""
    workloads = {w for s in systems.values() for w in s["workloads"]}
    for w in workloads:
        medians = {
            name: s["workloads"][w]["figures"]["steps_per_s"]["median"]
            for name, s in systems.items()
            if w in s["workloads"]
        }
        for name, s in systems.items():
            if w not in s["workloads"]:
                continue
            mine = medians[name]
            others = [v for n, v in medians.items() if n != name and v]
            figures = s["workloads"][w]["figures"]
            if w.startswith("w4"):  # open loop: steps/s is the offered load, not a speed
                figures["ratio_vs_best_peer"] = spread([])
                figures["ratio_vs_pgbench"] = spread([])
                continue
            ratio = mine / max(others) if others and mine is not None else None
            figures["ratio_vs_best_peer"] = {"median": ratio, "min": None, "max": None, "runs": 1}
            vs_pg = mine / pgbench_tps if pgbench_tps and mine is not None else None
            figures["ratio_vs_pgbench"] = {"median": vs_pg, "min": None, "max": None, "runs": 1}
