"""Percentiles and medians-with-spread: the only arithmetic the suite's figures use."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 and max of a latency sample (ms)."""
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "n": float(len(values)),
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max over repeats (None values — a figure a system lacks — skipped)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "runs": len(present),
    }
