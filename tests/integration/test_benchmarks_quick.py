"""`python -m benchmarks --quick` runs end to end and writes every figure for every system.

Speeds are never asserted: this only keeps the suite from rotting. It needs PostgreSQL
(scratch databases are made and dropped), redis-server (the suite starts its own) and the
`bench` extra (Celery, DBOS, matplotlib, psutil).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.figures import FIGURE_KEYS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)  # the quick suite takes about a minute; more on a busy machine
def test_quick_suite_writes_every_figure(postgres_url: str, tmp_path: Path) -> None:
    pytest.importorskip("celery")
    pytest.importorskip("dbos")
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    if "STREAMFLOW_TEST_POSTGRES_URL" in os.environ:
        env["STREAMFLOW_TEST_POSTGRES_URL"] = os.environ["STREAMFLOW_TEST_POSTGRES_URL"]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"streamflow", "celery", "dbos"}
    expected = {"w1", "w2", "w3", "w4@50%", "w4@80%"}
    for name, system in results["systems"].items():
        assert system["durability"], name
        assert set(system["workloads"]) == expected, name
        for wkey, entry in system["workloads"].items():
            missing = set(FIGURE_KEYS) - set(entry["figures"])
            assert not missing, f"{name} {wkey} lacks {sorted(missing)}"
            # every workflow finished with the right result, on every system
            assert entry["figures"]["wrong_results"]["median"] == 0, (name, wkey)
            assert entry["figures"]["steps_per_s"]["median"] > 0, (name, wkey)
    for key in ("pgbench_tps", "insert_tps", "redis_xadd_rps", "redis_rt_p50_ms"):
        assert results["physical"]["median"][key]["median"] is not None, key
    assert results["reconciler_scaling"]["timings"]
    assert results["rss_soak"]["steps"] > 0
    ids = {t["id"] for t in results["targets"]}
    assert {"w1_throughput", "w2_throughput", "w1_vs_pgbench", "w3_hop_p50", "rss_flat"} <= ids
    assert all(t["met"] in (True, False) for t in results["targets"]), results["targets"]
    table = (out / "results.md").read_text()
    assert "| target |" in table and "W3 hop latency p50" in table
