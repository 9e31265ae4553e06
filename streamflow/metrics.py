"""A Prometheus exporter built on `streamflow.telemetry` (the optional `metrics` extra).

```
pip install 'streamflow[metrics]'
streamflow worker --app myapp.workers --metrics-port 9464     # http://127.0.0.1:9464/metrics
```

Every telemetry event is a counter, `streamflow_workflow_<event>_total`, labelled with the
event's allow-listed metadata keys (absent ones are ""), incremented by its `count`.
Durations are histograms in seconds. Labels therefore inherit the allow-list's bounds;
on top of that the two operator-named labels (workflow_name, queue) are capped at
`max_label_values` distinct values per process, after which new values count as
"_other", so a misused workflow name cannot grow the series without bound.

Metric names are listed in docs/telemetry.md.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from streamflow import telemetry
from streamflow.telemetry import EVENTS, Event

NAMESPACE: Final = "streamflow_workflow"
#: Labels whose values are named by the app or operator, not by Streamflow.
OPEN_LABELS: Final = frozenset(k for k, v in telemetry.ALLOWED_METADATA.items() if v is None)
OTHER: Final = "_other"

_FAST = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SLOW = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)


@dataclass(frozen=True, slots=True)
class _HistogramSpec:
    name: str
    doc: str
    #: (event, measurement in ms) pairs observed into this histogram.
    sources: tuple[tuple[Event, str], ...]
    labels: tuple[str, ...]
    buckets: tuple[float, ...]


HISTOGRAMS: Final = (
    _HistogramSpec(
        "step_duration_seconds",
        "How long a step's perform took, by its recorded status.",
        (
            (Event.STEP_COMPLETED, "duration_ms"),
            (Event.STEP_FAILED, "duration_ms"),
            (Event.STEP_CANCELLED, "duration_ms"),
        ),
        ("workflow_name", "queue", "status"),
        _FAST,
    ),
    _HistogramSpec(
        "step_queue_wait_seconds",
        "From a step becoming available to a worker claiming it.",
        ((Event.STEP_STARTED, "queue_wait_ms"),),
        ("workflow_name", "queue"),
        _FAST,
    ),
    _HistogramSpec(
        "ready_hop_seconds",
        "From a ready message's publish to the claim it led to.",
        ((Event.STEP_STARTED, "ready_hop_ms"),),
        ("queue",),
        _FAST,
    ),
    _HistogramSpec(
        "event_hop_seconds",
        "From a completion event's publish to a consumer recording it.",
        ((Event.EVIDENCE_RECORDED, "event_hop_ms"),),
        ("classification",),
        _FAST,
    ),
    _HistogramSpec(
        "duration_seconds",
        "From a workflow's insert to its final outcome.",
        ((Event.WORKFLOW_FINISHED, "workflow_duration_ms"),),
        ("workflow_name", "outcome"),
        _SLOW,
    ),
)


def counter_name(event: Event) -> str:
    """The exposed counter for an event: streamflow.workflow.x -> streamflow_workflow_x_total."""
    return f"{NAMESPACE}_{event.value.removeprefix(telemetry.PREFIX)}_total"


class PrometheusExporter:
    """Keeps counters and histograms from telemetry events in its own registry."""

    def __init__(
        self, registry: CollectorRegistry | None = None, max_label_values: int = 200
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_label_values = max_label_values
        self._seen: dict[str, set[str]] = {k: set() for k in OPEN_LABELS}
        self._lock = threading.Lock()
        self._counters: dict[Event, tuple[Counter, tuple[str, ...]]] = {}
        for event, spec in EVENTS.items():
            labels = tuple(sorted(spec.metadata))
            # prometheus_client adds the _total suffix itself.
            name = counter_name(event).removesuffix("_total")
            self._counters[event] = (
                Counter(name, spec.doc, labels, registry=self.registry),
                labels,
            )
        self._histograms: dict[Event, list[tuple[str, Histogram, tuple[str, ...]]]] = {}
        for h in HISTOGRAMS:
            histogram = Histogram(
                f"{NAMESPACE}_{h.name}", h.doc, h.labels, registry=self.registry, buckets=h.buckets
            )
            for event, measurement in h.sources:
                self._histograms.setdefault(event, []).append((measurement, histogram, h.labels))
        self._handle: telemetry.Handle | None = None

    def attach(self) -> PrometheusExporter:
        if self._handle is None:
            self._handle = telemetry.attach(self.handle, name="prometheus")
        return self

    def detach(self) -> None:
        if self._handle is not None:
            telemetry.detach(self._handle)
            self._handle = None

    def handle(
        self, event: str, measurements: Mapping[str, float], metadata: Mapping[str, str | int]
    ) -> None:
        try:
            ev = Event(event)
        except ValueError:
            return
        counter, labels = self._counters[ev]
        counter.labels(*self._values(labels, metadata)).inc(measurements.get("count", 1.0))
        for measurement, histogram, hlabels in self._histograms.get(ev, ()):
            value = measurements.get(measurement)
            if value is not None:
                histogram.labels(*self._values(hlabels, metadata)).observe(value / 1000)

    def _values(self, labels: tuple[str, ...], metadata: Mapping[str, str | int]) -> list[str]:
        out = []
        for key in labels:
            value = str(metadata.get(key, ""))
            if key in self._seen and value:
                value = self._bounded(key, value)
            out.append(value)
        return out

    def _bounded(self, key: str, value: str) -> str:
        seen = self._seen[key]
        if value in seen:
            return value
        with self._lock:
            if len(seen) >= self.max_label_values:
                return OTHER
            seen.add(value)
        return value


@dataclass
class MetricsServer:
    """A running exporter and its HTTP endpoint; `close()` stops both."""

    exporter: PrometheusExporter
    server: WSGIServer
    host: str
    port: int

    def close(self) -> None:
        self.exporter.detach()
        self.server.shutdown()
        self.server.server_close()


def serve(port: int, host: str = "127.0.0.1", max_label_values: int = 200) -> MetricsServer:
    """Attach an exporter and serve /metrics on host:port (port 0: any free port).

    Raises OSError when the port cannot be bound.
    """
    exporter = PrometheusExporter(max_label_values=max_label_values)
    server, _thread = start_http_server(port, addr=host, registry=exporter.registry)
    exporter.attach()
    return MetricsServer(exporter, server, host, int(server.server_address[1]))
