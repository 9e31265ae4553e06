"""Writing a run's results: results.json (everything), results.md (the tables) and
results.png (throughput and latency distributions per system)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.figures import FIGURE_KEYS

_LABELS = {
    "steps_per_s": "steps/s",
    "workflows_per_s": "workflows/s",
    "latency_p50_ms": "latency p50 ms",
    "latency_p95_ms": "p95 ms",
    "latency_p99_ms": "p99 ms",
    "hop_p50_ms": "hop p50 ms",
    "hop_p95_ms": "hop p95 ms",
    "hop_p99_ms": "hop p99 ms",
    "pg_commits_per_step": "PG commits/step",
    "redis_commands_per_step": "Redis cmds/step",
    "cpu_s_per_1k_steps_system": "CPU s/1k steps: system",
    "cpu_s_per_1k_steps_postgres": "PG",
    "cpu_s_per_1k_steps_redis": "Redis",
    "peak_worker_rss_mb": "peak RSS MB",
    "ratio_vs_best_peer": "x best other",
    "ratio_vs_pgbench": "x pgbench TPS",
    "max_submit_lag_ms": "submit lag ms",
    "wrong_results": "wrong results",
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(fig: dict[str, Any]) -> str:
    median = _fmt(fig.get("median"))
    lo, hi = fig.get("min"), fig.get("max")
    if fig.get("runs", 0) > 1 and lo is not None and hi is not None and lo != hi:
        return f"{median} ({_fmt(lo)}-{_fmt(hi)})"
    return median


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark results ({meta['mode']})",
        "",
        f"Measured {meta['started_at']} -> {meta['finished_at']} on {meta['host']['cpus']} "
        f"CPUs, Python {meta['host']['python']}, {meta['host']['postgres']}, Redis "
        f"{meta['host']['redis']}; {meta['concurrency']} workers per system; medians of "
        f"{meta['repeats']} repeat(s), (min-max) where they differ. "
        f"Command: `{meta['command']}`.",
        "",
    ]
    git = meta.get("git") or {}
    if git.get("commit"):
        dirty = git.get("uncommitted_engine_files") or []
        lines += [
            f"Code measured: commit `{git['commit']}`"
            + (f" plus uncommitted changes to {', '.join(dirty)}." if dirty else "."),
            "",
        ]
    if meta.get("note"):
        lines += [f"> {meta['note']}", ""]
    lines += [
        "## Targets",
        "",
        "| target | measured | met | by how much | note |",
        "|---|---:|:-:|---|---|",
    ]
    for t in results["targets"]:
        met = {True: "✅", False: "❌", None: "-"}[t["met"]]
        lines.append(
            f"| {t['target']} | {_fmt(t['measured'])} | {met} | {t['gap']} | {t['note']} |"
        )
    phys = results["physical"]["median"]
    lines += [
        "",
        "## Physical limits",
        "",
        "| what | median | (min-max) |",
        "|---|---:|---|",
    ]
    for key, label in (
        ("pgbench_tps", f"pgbench -N TPS at {meta['concurrency']} clients"),
        ("insert_tps", f"single-row ledger-shaped INSERT TPS at {meta['concurrency']} clients"),
        ("insert_p99_ms", "... its p99 ms"),
        ("redis_xadd_rps", "redis-benchmark XADD requests/s (50 clients)"),
        ("redis_rt_p50_ms", "redis-py XADD->XREADGROUP->XACK p50 ms"),
        ("redis_rt_p99_ms", "... p99 ms"),
    ):
        fig = phys.get(key, {})
        spread = f"{_fmt(fig.get('min'))}-{_fmt(fig.get('max'))}" if fig.get("runs", 0) > 1 else ""
        lines.append(f"| {label} | {_fmt(fig.get('median'))} | {spread} |")
    lines += ["", "## Systems", "", "| system | version | durability |", "|---|---|---|"]
    for name, s in results["systems"].items():
        lines.append(f"| {name} | {s['version']} | {s['durability']} |")
    order = list(results["workload_titles"])
    main_keys = [k for k in FIGURE_KEYS if k not in ("max_submit_lag_ms", "wrong_results")]
    for w in order:
        lines += ["", f"## {_title(results, w)}", ""]
        if w.startswith("w4@"):
            offered = ", ".join(f"{name} {rate:.1f}" for name, rate in _offered(results, w).items())
            lines += [
                f"Offered workflows/s (the load x the system's median W1 workflows/s): {offered}.",
                "",
            ]
        lines.append("| figure | " + " | ".join(results["systems"]) + " |")
        lines.append("|---|" + "---:|" * len(results["systems"]))
        for key in [*main_keys, "max_submit_lag_ms", "wrong_results"]:
            row = [
                _cell(s["workloads"][w]["figures"][key]) if w in s["workloads"] else "-"
                for s in results["systems"].values()
            ]
            lines.append(f"| {_LABELS[key]} | " + " | ".join(row) + " |")
    lines += ["", "## Reconciler scaling", ""]
    scaling = results.get("reconciler_scaling") or {}
    lines.append(scaling.get("table", "not measured"))
    soak = results.get("rss_soak") or {}
    if soak:
        lines += [
            "",
            "## Worker RSS over a long run",
            "",
            f"Streamflow, {soak['steps']:,} steps of W1-shaped chains: RSS "
            f"{_fmt(soak['rss_start_mb'])} MB after the first tenth, {_fmt(soak['rss_end_mb'])} "
            f"MB at the end (growth {soak['growth']:.1%}); {soak['steps_per_s']:.0f} steps/s.",
        ]
    lines += ["", "## How to read this", "", *results["notes"]]
    return "\n".join(lines) + "\n"


def _title(results: dict[str, Any], w: str) -> str:
    if w.startswith("w4@"):  # each system runs at its own rate: no one rate in the title
        return f"W4 open loop at {w[3:]} of each system's own W1 maximum"
    return str(results["workload_titles"][w])


def _offered(results: dict[str, Any], w: str) -> dict[str, float]:
    load = float(w[3:].rstrip("%")) / 100
    out = {}
    for name, s in results["systems"].items():
        w1 = s["workloads"].get("w1", {}).get("figures", {}).get("workflows_per_s", {})
        if w in s["workloads"] and w1.get("median"):
            out[name] = load * w1["median"]
    return out


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.md"
    path.write_text(markdown(results))
    return path


def write_plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "results.png"
    systems = list(results["systems"])
    colours = {"streamflow": "#1f77b4", "celery": "#2ca02c", "dbos": "#d62728"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    # 1. throughput per workload, median with min-max whiskers
    ax = axes[0][0]
    burst = [w for w in results["workload_titles"] if not w.startswith("w4")]
    width = 0.8 / max(1, len(systems))
    for k, name in enumerate(systems):
        meds, lo, hi = [], [], []
        for w in burst:
            f = results["systems"][name]["workloads"].get(w, {}).get("figures", {})
            s = f.get("steps_per_s", {})
            m = s.get("median") or 0
            meds.append(m)
            lo.append(m - (s.get("min") or m))
            hi.append((s.get("max") or m) - m)
        xs = [i + k * width for i in range(len(burst))]
        ax.bar(xs, meds, width, yerr=[lo, hi], label=name, color=colours.get(name))
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(burst))])
    ax.set_xticklabels([w.upper() for w in burst])
    ax.set_ylabel("steps/s (median, min-max)")
    tps = (results["physical"]["median"].get("pgbench_tps") or {}).get("median")
    if tps:
        ax.axhline(tps, linestyle="--", color="grey", linewidth=1)
        ax.text(0, tps, f" pgbench -N {tps:.0f} TPS", va="bottom", fontsize=8, color="grey")
    ax.set_title("Throughput")
    ax.legend()
    # 2. W3 hop latency distribution; 3. W4 end-to-end latency distributions
    samples = results.get("samples", {})
    _boxes(axes[0][1], samples, systems, ["w3"], "hops_ms", "W3 hop latency (ms, log)", colours)
    w4 = [w for w in results["workload_titles"] if w.startswith("w4")]
    _boxes(
        axes[1][0],
        samples,
        systems,
        w4 or ["w1"],
        "latencies_ms",
        "W4 end-to-end latency (ms, log)",
        colours,
    )
    # 4. CPU per 1,000 W1 steps, stacked: the system's processes, PostgreSQL, Redis
    ax = axes[1][1]
    bottoms = [0.0] * len(systems)
    for part, hatch in (("system", ""), ("postgres", "//"), ("redis", "..")):
        vals = []
        for name in systems:
            f = results["systems"][name]["workloads"].get("w1", {}).get("figures", {})
            vals.append(f.get(f"cpu_s_per_1k_steps_{part}", {}).get("median") or 0)
        ax.bar(
            systems,
            vals,
            bottom=bottoms,
            hatch=hatch,
            label=part,
            color=[colours.get(n) for n in systems],
            edgecolor="black",
            alpha=0.8,
        )
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_ylabel("CPU seconds per 1,000 steps (W1)")
    ax.set_title("CPU cost: plain = system, // = PostgreSQL, .. = Redis")
    fig.suptitle(
        f"Streamflow vs peers — {results['meta']['mode']} run, {results['meta']['started_at'][:16]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _boxes(
    ax: Any,
    samples: dict[str, Any],
    systems: list[str],
    workloads: list[str],
    key: str,
    title: str,
    colours: dict[str, str],
) -> None:
    data, labels, cols = [], [], []
    for w in workloads:
        for name in systems:
            values = samples.get(name, {}).get(w, {}).get(key) or []
            if values:
                data.append([max(v, 0.01) for v in values])
                labels.append(f"{name}\n{w}")
                cols.append(colours.get(name, "grey"))
    if data:
        parts = ax.boxplot(data, patch_artist=True, showfliers=True, whis=(1, 99))
        ax.set_xticks(range(1, len(labels) + 1))
        ax.set_xticklabels(labels, fontsize=8)
        for patch, colour in zip(parts["boxes"], cols, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        ax.set_yscale("log")
    ax.set_title(title + " — box: p25-p75, whiskers: p1-p99")
