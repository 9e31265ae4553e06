"""The issue's targets, checked against what this run measured. Nothing here is a
measured figure: every number compared comes from the results."""

from __future__ import annotations

from typing import Any

PEERS = ("celery", "dbos")


def _median(results: dict[str, Any], system: str, workload: str, key: str) -> float | None:
    try:
        value = results["systems"][system]["workloads"][workload]["figures"][key]["median"]
    except KeyError:
        return None
    return None if value is None else float(value)


def _check(
    tid: str, what: str, measured: float | None, op: str, target: float, unit: str, note: str = ""
) -> dict[str, Any]:
    if measured is None:
        return {
            "id": tid,
            "target": what,
            "measured": None,
            "met": None,
            "gap": "not measured",
            "note": note,
        }
    met = measured >= target if op == ">=" else measured <= target
    if op == ">=" and met:
        gap = f"met by {measured / target:.2f}x the target"
    elif op == ">=" and measured > 0:
        gap = (
            f"missed: {measured:.3g}{unit} is {measured / target:.0%} of {target:g}{unit} "
            f"(needs {target / measured:.2f}x more)"
        )
    elif op == ">=":
        gap = "missed"
    elif met:
        gap = f"met with {(1 - measured / target):.0%} to spare"
    else:
        gap = (
            f"missed: {measured:.3g}{unit} is {measured / target:.2f}x the limit of "
            f"{target:g}{unit}"
        )
    return {"id": tid, "target": what, "measured": measured, "met": met, "gap": gap, "note": note}


def _best_peer(results: dict[str, Any], workload: str, key: str) -> float | None:
    values = [_median(results, p, workload, key) for p in PEERS]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for w in ("w1", "w2"):
        ours = _median(results, "streamflow", w, "steps_per_s")
        best = _best_peer(results, w, "steps_per_s")
        ratio = ours / best if ours is not None and best else None
        out.append(
            _check(
                f"{w}_throughput",
                f"{w.upper()} steps/s ≥ 2x the best peer's",
                ratio,
                ">=",
                2.0,
                "x",
                f"streamflow {ours:.0f} steps/s, best peer {best:.0f}" if ratio else "",
            )
        )
    tps = (results.get("physical", {}).get("median", {}).get("pgbench_tps") or {}).get("median")
    ours = _median(results, "streamflow", "w1", "steps_per_s")
    out.append(
        _check(
            "w1_vs_pgbench",
            "W1 steps/s ≥ 1.0 x pgbench -N TPS at the same client count",
            ours / tps if ours is not None and tps else None,
            ">=",
            1.0,
            "x",
            f"pgbench -N {tps:.0f} TPS" if tps else "",
        )
    )
    out.append(
        _check(
            "w1_commits_per_step",
            "W1 PostgreSQL commits per step ≤ 1 (submission included)",
            _median(results, "streamflow", "w1", "pg_commits_per_step"),
            "<=",
            1.0,
            "",
        )
    )
    p50 = _median(results, "streamflow", "w3", "hop_p50_ms")
    p99 = _median(results, "streamflow", "w3", "hop_p99_ms")
    out.append(_check("w3_hop_p50", "W3 hop latency p50 ≤ 1.5 ms", p50, "<=", 1.5, " ms"))
    out.append(_check("w3_hop_p99", "W3 hop latency p99 ≤ 4 ms", p99, "<=", 4.0, " ms"))
    peer_p50 = [v for p in PEERS if (v := _median(results, p, "w3", "hop_p50_ms")) is not None]
    peer_p99 = [v for p in PEERS if (v := _median(results, p, "w3", "hop_p99_ms")) is not None]
    if p50 is not None and p99 is not None and peer_p50 and peer_p99:
        worst = max(p50 / min(peer_p50), p99 / min(peer_p99))
        out.append(
            _check(
                "w3_hop_ahead",
                "W3 hop p50 and p99 below every peer's (ours ÷ best peer's ≤ 1)",
                worst,
                "<=",
                1.0,
                "x",
                f"best peer p50 {min(peer_p50):.2f} ms, p99 {min(peer_p99):.2f} ms",
            )
        )
    else:
        out.append(
            _check("w3_hop_ahead", "W3 hop p50 and p99 below every peer's", None, "<=", 1.0, "x")
        )
    out.extend(_reconciler_targets(results.get("reconciler_scaling") or {}))
    soak = results.get("rss_soak") or {}
    out.append(
        _check(
            "rss_flat",
            f"worker RSS growth < 10% across {soak.get('steps', 0):,} steps",
            soak.get("growth"),
            "<=",
            0.10,
            "",
            "" if soak.get("steps", 0) >= 100_000 else "fewer steps than the target's 100,000",
        )
    )
    return out


def _reconciler_targets(scaling: dict[str, Any]) -> list[dict[str, Any]]:
    clean = sorted(
        (t for t in scaling.get("timings", []) if t["scenario"] == "nothing to repair"),
        key=lambda t: t["steps"],
    )
    if not clean:
        return [
            _check(
                "reconciler_1m",
                "reconciler pass, nothing to repair, 1M steps ≤ 50 ms",
                None,
                "<=",
                50,
                " ms",
            ),
            _check(
                "reconciler_growth", "1M-step pass ≤ 1.5x the 100k-step pass", None, "<=", 1.5, "x"
            ),
        ]
    big, small = clean[-1], clean[0]
    note = "" if big["steps"] >= 1_000_000 else f"largest ledger measured: {big['steps']:,} steps"
    growth = big["median_ms"] / small["median_ms"] if small["median_ms"] else None
    return [
        _check(
            "reconciler_1m",
            "reconciler pass, nothing to repair, 1M steps ≤ 50 ms",
            big["median_ms"],
            "<=",
            50.0,
            " ms",
            note,
        ),
        _check(
            "reconciler_growth",
            f"pass over {big['steps']:,} steps ≤ 1.5x the pass over {small['steps']:,}",
            growth if big is not small else None,
            "<=",
            1.5,
            "x",
            note,
        ),
    ]
