"""Many processes, partitioned streams, and changing the partition count while running.

Real `streamflow consume` and `streamflow worker` processes on a real PostgreSQL and
Redis. The workflows are the fault tests' mix (chains passing results, fan-out/fan-in,
failures with a `continue` cleanup, retries), checked against the outcome a fault-free
run must have; each process says what it handled in its exit summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, select

from ledger import tables as t
from tests.integration.processes import wait_for
from tests.integration.scaleout import Deployment, events_applied, summaries
from tests.integration.test_engine_faults import (
    chain,
    check_ledger,
    insert_all,
    mix,
    recoveries,
    runs,
    wait_finished,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def deploy(
    pg_engine: Engine, postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(partitions: int, prefix: str | None = None) -> Deployment:
        d = Deployment(postgres_url, redis_url, tmp_path, partitions)
        if prefix is not None:  # a second layout of the same deployment
            d.prefix = prefix
            d.env["STREAMFLOW_STREAM_PREFIX"] = prefix
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_two_workers_and_two_consumers_share_the_work_and_run_nothing_twice(
    pg_engine: Engine, deploy: Callable[..., Deployment]
) -> None:
    d = deploy(2)
    consumers = [d.consumer("c1"), d.consumer("c2")]
    workers = [d.worker("w1"), d.worker("w2")]
    expected = insert_all(pg_engine, mix(d.ctx))
    ids = list(expected)
    wait_finished(pg_engine, d, ids)  # type: ignore[arg-type]
    check_ledger(pg_engine, d, expected)  # type: ignore[arg-type]
    assert d.stop_all() == {p.name: 0 for p in d.procs}

    performed = runs(d)  # type: ignore[arg-type]
    by_worker = {w.name: summaries(w, "worker.stopped")[-1] for w in workers}
    by_consumer = {c.name: summaries(c, "consumer.stopped")[-1] for c in consumers}
    # Both workers ran steps and both consumers applied events: the groups spread them.
    assert all(s["completed"] > 0 for s in by_worker.values()), by_worker
    assert all(s["consumed"] > 0 for s in by_consumer.values()), by_consumer
    # Every perform is accounted for by exactly one worker's outcome count...
    outcomes = sum(
        s["completed"] + s["retried"] + s["failed"] + s["cancelled"] for s in by_worker.values()
    )
    assert outcomes == sum(performed.values())
    # ...and every outcome's event was applied exactly once, by one consumer or the other.
    applied = events_applied(pg_engine, ids)
    assert set(applied) == set(performed) and set(applied.values()) == {1}
    assert sum(s["consumed"] for s in by_consumer.values()) == len(performed)


def test_changing_the_partition_count_on_a_running_system_loses_nothing(
    pg_engine: Engine, deploy: Callable[..., Deployment]
) -> None:
    """N=1 dispatches ready messages nobody reads; N=4 processes replace it; every
    workflow completes, from the ledger, and the old stream is left untouched."""
    old = deploy(1)
    old.consumer("consumer-n1")
    expected = insert_all(pg_engine, [chain(i, old.ctx, 0.05) for i in range(10)])
    old_ready = old.keys().ready("default")
    client = redis.Redis.from_url(old.redis_url, decode_responses=True)
    try:
        # Every root is in the unpartitioned ready stream, and no worker reads it.
        wait_for(
            lambda: client.xlen(old_ready) >= 10,
            20,
            "the N=1 dispatcher to publish the roots",
            on_timeout=old.outputs,
        )
        # A reconciler pass is on record, so the new layout's first pass is not the
        # first ever (which would trust whatever Redis holds).
        wait_for(lambda: passes(pg_engine), 20, "an N=1 reconciler pass", on_timeout=old.outputs)
        assert old.stop_all() == {"consumer-n1": 0}
        expected |= insert_all(pg_engine, [chain(100 + i, old.ctx, 0.05) for i in range(5)])

        new = deploy(4, prefix=old.prefix)
        new.log = old.log  # one perform log for both layouts
        new.consumer("consumer-n4")
        new.worker("w1")
        new.worker("w2")
        ids = list(expected)
        wait_finished(pg_engine, new, ids)  # type: ignore[arg-type]
        check_ledger(pg_engine, new, expected)  # type: ignore[arg-type]

        # The old stream was never read by the new layout: its entries are still there
        # and undelivered; the ledger, not the stream, drove those steps.
        [info] = client.xinfo_groups(old_ready)
        assert client.xlen(old_ready) >= 10 and info["pending"] == 0
        assert info["entries-read"] in (None, 0) or info["lag"] >= 10
        # The new partitions' missing epoch markers made the reconciler re-dispatch.
        assert recoveries(pg_engine, ids)["streams_reset"] >= 10
        assert set(events_applied(pg_engine, ids).values()) <= {1}
    finally:
        client.close()
    assert any("streams_reset" in (p or {}).get("repairs", {}) for p in passes(pg_engine))


def passes(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return list(conn.execute(select(t.reconciler_passes.c.summary)).scalars().all())
