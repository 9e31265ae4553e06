"""Many engine processes over one ledger and one Redis (or Redis Cluster), for the
scale-out tests: start them, stop them, and read what each says it handled.

Every process logs a summary line when SIGTERM stops it — `worker.stopped` with what
the worker claimed and completed, `consumer.stopped` with the events it consumed — so
"the work spread" is read from the processes themselves, not inferred.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, select

from ledger import tables as t
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import connect
from tests.integration.processes import Proc, base_env


class Deployment:
    """Consumer and worker processes sharing a ledger, a Redis URL and a key prefix."""

    def __init__(self, postgres_url: str, redis_url: str, tmp: Path, partitions: int) -> None:
        self.prefix = f"sfscale{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.partitions = partitions
        self.tmp = tmp
        self.env = base_env(
            STREAMFLOW_DATABASE_URL=postgres_url,
            STREAMFLOW_REDIS_URL=redis_url,
            STREAMFLOW_STREAM_PREFIX=self.prefix,
            STREAMFLOW_STREAM_PARTITIONS=str(partitions),
        )
        self.procs: list[Proc] = []
        self.log = tmp / "performs.jsonl"
        self.ctx: dict[str, Any] = {"log": str(self.log)}

    def keys(self, partitions: int | None = None) -> StreamKeys:
        return StreamKeys(prefix=self.prefix, partitions=partitions or self.partitions)

    def start(self, *args: str, name: str) -> Proc:
        p = Proc(list(args), self.env, self.tmp, name)
        self.procs.append(p)
        return p

    def consumer(self, name: str, *extra: str) -> Proc:
        # A lost ready message is sent again after 1 s, the reconciler passes every 1 s.
        return self.start(
            "consume", "--redispatch-after", "1", "--reconcile-every", "1", *extra, name=name
        )

    def worker(self, name: str, *extra: str, concurrency: int = 4) -> Proc:
        return self.start(
            "worker",
            "--app",
            "tests.engine_app",
            "--queues",
            "default",
            "--concurrency",
            str(concurrency),
            *extra,
            name=name,
        )

    def outputs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-3000:]}" for p in self.procs)

    def logged(self, event: str) -> int:
        return sum(p.output().count(f'"event": "{event}"') for p in self.procs)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every running process; their exit codes by name."""
        return {p.name: p.terminate() for p in self.procs if p.running}

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        self._delete_keys()

    def _delete_keys(self) -> None:
        try:
            transport = connect(self.redis_url, socket_timeout=2, socket_connect_timeout=1)
        except redis.RedisError:
            return  # a disposable server already gone takes its keys with it
        client = transport.client
        try:
            for pattern in self.keys(1).patterns:
                for key in list(client.scan_iter(match=pattern, count=1000)):
                    client.delete(key)
        except redis.RedisError:
            pass
        finally:
            client.close()


def summaries(proc: Proc, event: str) -> list[dict[str, Any]]:
    """The JSON lines of `event` a process logged (its exit summary, for *.stopped)."""
    found = []
    for line in proc.output().splitlines():
        if f'"event": "{event}"' in line:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def events_applied(engine: Engine, ids: list[str]) -> Counter[tuple[str, str, int]]:
    """How often each (workflow, step, attempt)'s completion event was applied: a
    consumer's `consumed`, or the reconciler's `dropped` that applied it instead."""
    e = t.evidence
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.c.workflow_id, e.c.step, e.c.attempt).where(
                e.c.workflow_id.in_(ids),
                e.c.kind == "event",
                e.c.classification.in_(["consumed", "dropped"]),
            )
        ).all()
    return Counter((r.workflow_id, r.step, r.attempt) for r in rows)
