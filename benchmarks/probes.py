"""CPU and memory of the processes a system runs, sampled while it runs.

A sampler thread reads, every few hundred milliseconds, the CPU times and RSS of each
system's process tree, of the PostgreSQL backends serving its database, and of the
suite's redis-server. CPU is counted from the first sample after the system said it was
ready (its start-up and imports are not the workload's), to the last sample before it is
stopped. A process that appears mid-run (a new backend, a forked child) counts from zero.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


@dataclass
class _Group:
    """CPU seconds of a changing set of processes: first and last reading per pid."""

    first: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)

    def see(self, pid: int, cpu: float, baseline: bool) -> None:
        if pid not in self.first:
            self.first[pid] = cpu if baseline else 0.0
        self.last[pid] = cpu

    @property
    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)


class Sampler:
    """Samples `groups` (name -> a callable giving the root pids now) until stopped."""

    def __init__(
        self,
        groups: dict[str, Callable[[], Iterable[int]]],
        rss_groups: Iterable[str],
        interval: float = 0.2,
    ) -> None:
        self._sources = groups
        self._rss_names = set(rss_groups)
        self._interval = interval
        self._groups = {name: _Group() for name in groups}
        self.peak_rss: dict[str, int] = {name: 0 for name in self._rss_names}
        self.rss_series: dict[str, list[int]] = {name: [] for name in self._rss_names}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _sample(self, baseline: bool) -> None:
        for name, source in self._sources.items():
            group = self._groups[name]
            rss_total = 0
            try:
                roots = list(source())
            except Exception:  # a source that cannot answer now (e.g. DB busy): skip once
                continue
            for pid in roots:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error), proc.oneshot():
                            group.see(proc.pid, _cpu(proc), baseline)
                            if name in self._rss_names:
                                rss_total += proc.memory_info().rss
            if name in self._rss_names and rss_total:
                self.rss_series[name].append(rss_total)
                self.peak_rss[name] = max(self.peak_rss[name], rss_total)

    def start(self) -> None:
        with self._lock:
            self._sample(baseline=True)
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                self._sample(baseline=False)

    def stop(self) -> dict[str, float]:
        """Take a last sample, stop, and return CPU seconds per group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._sample(baseline=False)
        return {name: group.seconds for name, group in self._groups.items()}
