"""The Prometheus exporter in real processes: `--metrics-port`, scraped over HTTP.

`streamflow run` on the embedded default (SQLite in a temporary directory, the in-process
stream) needs no servers; `streamflow worker` + `streamflow consume` run on real
PostgreSQL and Redis. Each process is started with `--metrics-port 0` and says which port
it bound, so there is no guessing at free ports. Every wait is bounded.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select

import streamflow
from ledger import tables as t
from ledger.db import make_engine
from streamflow import Dep, Workflow, cli
from streamflow.streams.keys import StreamKeys
from tests import engine_app as app
from tests.integration.processes import ROOT, base_env, wait_for

SERVING = re.compile(r"Serving Prometheus metrics on http://([\d.]+):(\d+)/metrics")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Process:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.log_path = cwd / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "streamflow", *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics_url(self) -> str:
        def bound() -> str | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited early:\n{self.output()[-3000:]}")
            m = SERVING.search(self.output())
            return f"http://{m.group(1)}:{m.group(2)}/metrics" if m else None

        return wait_for(bound, 30, "the metrics endpoint", on_timeout=self.output)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(30)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL if still running (a no-op after `stop`)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.kill()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def forbidden_values(engine: Engine, workflow_ids: list[str]) -> set[str]:
    found = set(workflow_ids)
    with engine.connect() as conn:
        for row in conn.execute(
            select(t.steps.c.name, t.steps.c.args).where(t.steps.c.workflow_id.in_(workflow_ids))
        ):
            found.add(row.name)
            found.update(str(v) for v in row.args.values())
        for (payload,) in conn.execute(
            select(t.results.c.payload).where(t.results.c.workflow_id.in_(workflow_ids))
        ):
            found.add(str(payload))
    return found


def assert_no_user_data_in_labels(samples: Samples, forbidden: set[str]) -> None:
    for name, labels in samples:
        for key, value in labels:
            assert value not in forbidden, (name, key, value)
            assert not re.fullmatch(r"[0-9a-f]{32}", value), (name, key, value)


def workflow(name: str) -> Workflow:
    return (
        Workflow.new(name)
        .add("first", app.Echo.new({"secret": "arg-secret-metrics"}))
        .add("second", app.Echo.new(), deps=["first"])
        .add("broken", app.Explode.new(), deps=["first"])
        .add("after", app.Echo.new(), deps=[Dep("broken", policy="continue")])
    )


def test_run_serves_counters_and_histograms_without_ids(
    tmp_path: Path, processes: list[Process]
) -> None:
    proc = Process(
        ["run", "--app", "tests.engine_app", "--metrics-port", "0", "--drain-seconds", "5"],
        base_env(PYTHONPATH=str(ROOT)),
        tmp_path,
        "run",
    )
    processes.append(proc)
    url = proc.metrics_url()
    assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise

    engine = make_engine(f"sqlite:///{tmp_path / 'streamflow.db'}")
    try:
        name = f"metrics-{uuid.uuid4().hex[:6]}"
        wids = [Workflow.insert(workflow(name), engine).id for _ in range(3)]
        wait_for(
            lambda: all(Workflow.get(engine, w).finished for w in wids),
            30,
            "the workflows to finish",
            on_timeout=proc.output,
        )
        forbidden = forbidden_values(engine, wids)
    finally:
        engine.dispose()

    def scraped() -> Samples | None:
        # Completion events are accounted for after the workflows finish (the consumer
        # gathers them into batches), so wait for that too rather than race it.
        s = scrape(url)
        done = total(s, "streamflow_workflow_workflow_finished_total", workflow_name=name)
        consumed = total(
            s, "streamflow_workflow_evidence_recorded_total", classification="consumed"
        )
        return s if done == 3 and consumed > 0 else None

    samples = wait_for(scraped, 15, "the finished workflows in the metrics")
    s = samples
    # Events count in the process that emits them: these workflows were inserted here,
    # in the test, so the engine process saw no `inserted`.
    assert total(s, "streamflow_workflow_inserted_total") == 0
    assert total(s, "streamflow_workflow_step_completed_total", workflow_name=name) == 9
    assert total(s, "streamflow_workflow_step_failed_total", status="failed") == 3
    assert total(s, "streamflow_workflow_step_started_total", queue="default") == 12
    assert total(s, "streamflow_workflow_step_released_total", workflow_name=name) == 9
    assert total(s, "streamflow_workflow_evidence_recorded_total", classification="consumed") > 0
    for histogram in (
        "streamflow_workflow_step_duration_seconds",
        "streamflow_workflow_step_queue_wait_seconds",
        "streamflow_workflow_ready_hop_seconds",
        "streamflow_workflow_duration_seconds",
    ):
        assert total(samples, histogram + "_count") > 0, histogram
        assert total(samples, histogram + "_bucket", le="+Inf") > 0, histogram
    assert total(samples, "streamflow_workflow_duration_seconds_count", outcome="failed") == 3
    assert {"arg-secret-metrics", "first", wids[0]} <= forbidden
    assert_no_user_data_in_labels(samples, forbidden)
    assert proc.stop() == 0


@pytest.mark.postgres
def test_worker_and_consumer_each_serve_their_own_metrics(
    pg_engine: Engine, postgres_url: str, redis_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    prefix = f"sfmetrics{uuid.uuid4().hex[:8]}"
    env = base_env(
        STREAMFLOW_DATABASE_URL=postgres_url,
        STREAMFLOW_REDIS_URL=redis_url,
        STREAMFLOW_STREAM_PREFIX=prefix,
    )
    worker = Process(
        ["worker", "--app", "tests.engine_app", "--metrics-port", "0", "--drain-seconds", "5"],
        env,
        tmp_path,
        "worker",
    )
    consumer = Process(["consume", "--metrics-port", "0"], env, tmp_path, "consume")
    processes.extend([worker, consumer])
    worker_url, consumer_url = worker.metrics_url(), consumer.metrics_url()
    try:
        name = f"metrics-pg-{uuid.uuid4().hex[:6]}"
        wids = [Workflow.insert(workflow(name), pg_engine).id for _ in range(2)]
        wait_for(
            lambda: all(Workflow.get(pg_engine, w).finished for w in wids),
            30,
            "the workflows to finish",
            on_timeout=lambda: worker.output()[-2000:] + consumer.output()[-2000:],
        )
        forbidden = forbidden_values(pg_engine, wids)

        def finished_in_worker() -> Samples | None:
            s = scrape(worker_url)
            n = total(s, "streamflow_workflow_workflow_finished_total", workflow_name=name)
            return s if n == 2 else None

        def consumed() -> Samples | None:
            s = scrape(consumer_url)
            n = total(s, "streamflow_workflow_evidence_recorded_total", classification="consumed")
            return s if n >= 8 else None

        from_worker = wait_for(finished_in_worker, 15, "the worker's metrics")
        from_consumer = wait_for(consumed, 15, "the consumer's metrics")
        assert worker.stop() == 0
        assert consumer.stop() == 0
    finally:
        worker.kill()
        consumer.kill()
        redis_keys(redis_url, StreamKeys(prefix=prefix))
    assert total(from_worker, "streamflow_workflow_step_started_total", workflow_name=name) == 8
    assert total(from_worker, "streamflow_workflow_step_duration_seconds_count") == 8
    assert total(from_consumer, "streamflow_workflow_event_hop_seconds_count") >= 8
    # The consumer records no step outcomes of its own.
    assert total(from_consumer, "streamflow_workflow_step_completed_total") == 0
    assert_no_user_data_in_labels(from_worker, forbidden)
    assert_no_user_data_in_labels(from_consumer, forbidden)


def redis_keys(url: str, keys: StreamKeys) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        mine = list(client.scan_iter(match=keys.pattern, count=1000))
        if mine:
            client.delete(*mine)
    finally:
        client.close()


# -- the CLI's errors --------------------------------------------------------------------------


def test_without_the_extra_the_error_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "streamflow.metrics", None)
    monkeypatch.delattr(streamflow, "metrics", raising=False)
    with pytest.raises(cli.CliError) as caught:
        cli._serve_metrics(0, "127.0.0.1")
    assert str(caught.value) == (
        "--metrics-port needs prometheus-client: pip install 'streamflow[metrics]'"
    )
    assert caught.value.code == cli.EXIT_USAGE


def test_a_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(cli.CliError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            cli._serve_metrics(port, "127.0.0.1")
