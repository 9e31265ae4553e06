"""The benchmark's DBOS Transact app, run as its own process by `benchmarks.systems.dbos`.

DBOS is a library inside the application's process: workflows and their steps run in
that process's threads, checkpointed to PostgreSQL. So this process is both the client
(it enqueues) and the worker (a queue with worker_concurrency 4 runs them).

    python -m benchmarks.peers.dbos_app '<workload json>' DATABASE_URL

Protocol on stdin/stdout: prints `ready` once launched; on `go` submits the workload on
schedule, waits for every result, prints one JSON line; on `exit` shuts down.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from dbos import DBOS

from benchmarks.workloads import Workload
from benchmarks.workloads.body import run_step

#: How often a queue looks for work (BENCH_DBOS_POLL). DBOS's default is 1 s: a freed slot
#: waits up to that long, so a 3-step chain would run at a few workflows a second. The
#: suite gives DBOS a 10 ms poll (its best throughput here), paid for in polling queries.
POLL = float(os.environ.get("BENCH_DBOS_POLL", "0.01"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "4"))


@DBOS.step()
def step(name: str, wf: int, inputs: list[int]) -> int:
    return run_step(name, wf, inputs)


@DBOS.workflow()
def chain_workflow(wf: int, length: int) -> int:
    value = step("s0", wf, [])
    for k in range(1, length):
        value = step(f"s{k}", wf, [value])
    return value


@DBOS.workflow()
def mid_workflow(wf: int, name: str, root: int) -> int:
    return step(name, wf, [root])


@DBOS.workflow()
def fan_workflow(wf: int, width: int) -> int:
    root = step("root", wf, [])
    mids = DBOS.retrieve_queue("bench_steps")
    assert mids is not None
    handles = [mids.enqueue(mid_workflow, wf, f"m{j}", root) for j in range(width)]
    return step("join", wf, [h.get_result() for h in handles])


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = json.loads(argv[0])
    workload = Workload(**spec)
    DBOS(
        config={
            "name": "bench",
            "system_database_url": argv[1],
            "log_level": "WARNING",
            "sys_db_pool_size": 20,
        }
    )
    DBOS.launch()
    workflows = DBOS.register_queue(
        "bench_workflows", worker_concurrency=CONCURRENCY, polling_interval_sec=POLL
    )
    # the parallel steps of W2 get their own queue: a parent waiting on its children
    # must not hold the slots its children need
    DBOS.register_queue("bench_steps", worker_concurrency=CONCURRENCY, polling_interval_sec=POLL)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "go":
            print(json.dumps(_run(workload, workflows)), flush=True)
        elif command == "exit":
            break
    DBOS.destroy()
    return 0


def _run(workload: Workload, queue: Any) -> dict[str, Any]:
    arrivals = workload.arrivals()
    handles = []
    t_start = time.time()
    lag = 0.0
    for i, offset in enumerate(arrivals):
        due = t_start + offset
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        lag = max(lag, time.time() - due)
        if workload.shape == "chain":
            handles.append(queue.enqueue(chain_workflow, i, workload.width))
        else:
            handles.append(queue.enqueue(fan_workflow, i, workload.width))
    results = [h.get_result() for h in handles]
    return {"t_start": t_start, "lag_ms": lag * 1000, "results": results}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
