"""The benchmark's Celery app: `celery -A benchmarks.peers.celery_app worker`.

Redis is broker and result backend (BENCH_CELERY_REDIS, a db of the suite's own server),
JSON serialisation, `acks_late=True` (a task is acknowledged after it ran, so a worker
killed mid-task has it redelivered), otherwise Celery's defaults.
"""

from __future__ import annotations

import os

from celery import Celery, chain, group

from benchmarks.workloads import Workload
from benchmarks.workloads.body import run_step

_URL = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/2")

app = Celery("bench", broker=_URL, backend=_URL)
app.conf.update(
    task_acks_late=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue="bench",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)


@app.task(name="bench.first")
def first(wf: int, step: str) -> int:
    return run_step(step, wf, [])


@app.task(name="bench.next")
def nxt(prev: int, wf: int, step: str) -> int:
    return run_step(step, wf, [prev])


@app.task(name="bench.join")
def join(results: list[int], wf: int) -> int:
    return run_step("join", wf, list(results))


def signature(workload: Workload, i: int) -> chain:
    """W1/W3: chain(first, next, ...); W2: chain(root, group(mids)) | join — a chord."""
    names = workload.step_names()
    if workload.shape == "chain":
        return chain(first.s(i, names[0]), *(nxt.s(i, n) for n in names[1:]))
    mids = group(nxt.s(i, n) for n in names[1:-1])
    return chain(first.s(i, "root"), mids, join.s(i))
