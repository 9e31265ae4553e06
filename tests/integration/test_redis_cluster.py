"""Streamflow on a real three-master Redis Cluster, with one master killed mid-run.

The cluster is started from the local `redis-server` binary on free loopback ports
(`tests/integration/redis_cluster.py`) and always torn down. Eight stream partitions
spread over the three masters; two consumer and two worker processes run the fault
tests' mix of workflows. Mid-run one master is SIGKILLed and then restarted *empty*
(its slots, with every stream, group and epoch marker in them, are gone): the other
masters' partitions keep flowing meanwhile, and afterwards the ledger must show what a
fault-free run shows — DESIGN.md's invariants:

- every workflow has the expected outcome, step states and results;
- no step's `perform` started twice for one attempt; one stored result per completed step;
- every completion event applied at most once (fan-in joins released once);
- counters equal a recount of the steps;
- the loss is visible: the reconciler found the lost partitions' epoch markers gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.integration.processes import wait_for
from tests.integration.redis_cluster import RedisClusterServers
from tests.integration.scaleout import Deployment, events_applied, summaries
from tests.integration.test_engine_faults import (
    OUTAGE_EVENTS,
    check_ledger,
    insert_all,
    mix,
    runs,
    wait_finished,
)

pytestmark = pytest.mark.postgres

PARTITIONS = 8


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server and redis-cli are needed for the cluster test")
        pytest.skip("redis-server and redis-cli not installed")
    servers = RedisClusterServers(tmp_path / "cluster")
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def deployment(
    pg_engine: Engine, postgres_url: str, redis_cluster: RedisClusterServers, tmp_path: Path
) -> Iterator[Deployment]:
    d = Deployment(postgres_url, redis_cluster.url, tmp_path, PARTITIONS)
    try:
        yield d
    finally:
        d.close()


def test_a_master_killed_mid_run_loses_nothing(
    pg_engine: Engine, redis_cluster: RedisClusterServers, deployment: Deployment
) -> None:
    d = deployment
    keys = d.keys()
    # The partitions really are spread: every master serves some of them.
    homes = {p: redis_cluster.master_of(keys.completion_stream(p)) for p in keys.partition_ids}
    assert set(homes.values()) == set(redis_cluster.ports)

    d.consumer("c1")
    d.consumer("c2")
    d.worker("w1")
    d.worker("w2")
    expected = insert_all(pg_engine, mix(d.ctx))
    ids = list(expected)
    total = sum(len(e.states) for e in expected.values())
    wait_for(lambda: len(runs(d)) >= 15, 30, "15 performs", on_timeout=d.outputs)  # type: ignore[arg-type]

    victim = homes[0]
    lost = sorted(p for p, port in homes.items() if port == victim)
    redis_cluster.kill(victim)
    assert len(runs(d)) < total  # type: ignore[arg-type]
    signs = [f'"event": "{e}"' for e in OUTAGE_EVENTS]
    wait_for(
        lambda: any(s in p.output() for p in d.procs for s in signs),
        20,
        "a process to meet the dead master",
        on_timeout=d.outputs,
    )
    redis_cluster.restart_empty(victim)
    redis_cluster.wait_ok()

    wait_finished(pg_engine, d, ids)  # type: ignore[arg-type]
    check_ledger(pg_engine, d, expected)  # type: ignore[arg-type]
    applied = events_applied(pg_engine, ids)
    assert set(applied.values()) <= {1}, {k: n for k, n in applied.items() if n > 1}
    # The loss is on record: the reconcilers (one per consumer process) found exactly
    # the killed master's partitions with their epoch markers gone.
    wait_for(
        lambda: reset_partitions(d) >= set(lost),
        15,
        f"the reconcilers to notice partitions {lost} were emptied",
        on_timeout=d.outputs,
    )
    assert reset_partitions(d) == set(lost)
    assert all(p.running for p in d.procs), d.outputs()


def reset_partitions(d: Deployment) -> set[int]:
    """Partitions the processes' reconcilers found emptied (`reconciler.streams_reset`)."""
    return {
        partition
        for p in d.procs
        for line in summaries(p, "reconciler.streams_reset")
        for partition in line["partitions"]
    }
