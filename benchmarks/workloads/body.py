"""The one trivial step body every system runs, and the timing file it appends to."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

_fd: int | None = None
_pid: int | None = None


def note(wf: int, step: str, t0: float, t1: float) -> None:
    """Append `wf step t0 t1` to BENCH_TIMING_FILE. O_APPEND writes of one short line
    land whole whichever process or thread writes; one syscall per step."""
    global _fd, _pid
    path = os.environ.get("BENCH_TIMING_FILE")
    if not path:
        return
    if _fd is None or _pid != os.getpid():  # reopen after a fork (Celery prefork)
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _pid = os.getpid()
    os.write(_fd, f"{wf} {step} {t0:.6f} {t1:.6f}\n".encode())


def compute(step: str, wf: int, inputs: list[int]) -> int:
    """The step's value: a root returns its workflow number, a join the sum of its
    inputs, anything else its single input + 1 (a mid m<j> adds j)."""
    if not inputs:
        return wf
    if step == "join":
        return sum(inputs)
    if step.startswith("m"):
        return inputs[0] + int(step[1:])
    return inputs[0] + 1


def run_step(step: str, wf: int, inputs: list[int]) -> int:
    t0 = time.time()
    value = compute(step, wf, inputs)
    note(wf, step, t0, time.time())
    return value


def read_timings(path: Path) -> dict[int, dict[str, tuple[float, float]]]:
    """wf -> step -> (t0, t1); the first run of a step counts (a retry would be a second)."""
    out: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        wf, step = int(parts[0]), parts[1]
        out[wf].setdefault(step, (float(parts[2]), float(parts[3])))
    return out


def count_finished(path: Path, last_step: str) -> int:
    if not path.exists():
        return 0
    needle = f" {last_step} ".encode()
    return path.read_bytes().count(needle)
