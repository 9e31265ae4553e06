"""Where Streamflow's time goes under W1: py-spy on the worker and the consume process.

    python -m benchmarks.profile                       # 1,500 chains (4,500 steps)
    python -m benchmarks.profile --workflows 300 --out /tmp/prof
    python -m benchmarks.profile --chain 2000          # W3's shape: one chain alone
    python -m benchmarks.profile --fan 300             # W2's shape: root -> 10 -> join

Runs W1 through the same harness as the suite, with `py-spy record` attached to the
worker and to the consume process: CPU samples; the worker also with --idle, so waiting
on PostgreSQL and Redis shows; both with --gil, only the thread holding the interpreter
lock, which is where Python's own time goes. Writes the collapsed stacks (`*.txt`, for flamegraph
tools or speedscope) and prints, per process, the share of samples by layer and the
functions with the most inclusive time. Needs py-spy (the `bench` extra) and root or
ptrace permission.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from benchmarks.servers import DEFAULT_PG, Postgres, disposable_redis
from benchmarks.systems.base import Ctx, measure
from benchmarks.systems.streamflow import StreamflowSystem
from benchmarks.workloads import Workload

#: Leaf frames by where they are, first match wins.
LAYERS = (
    ("psycopg (PostgreSQL driver, incl. waiting on the server)", ("psycopg",)),
    ("sqlalchemy (Core: compiling, executing, result rows)", ("sqlalchemy",)),
    ("redis-py (incl. waiting on Redis)", ("redis/", "hiredis")),
    ("json / serialisation", ("json/",)),
    ("logging", ("logging/",)),
    ("ledger (our SQL operations)", ("ledger/",)),
    ("streamflow (engine, streams)", ("streamflow/",)),
    ("threading / queue / selectors (waiting)", ("threading.py", "queue.py", "selectors.py")),
    ("tenacity (retry wrapper)", ("tenacity",)),
)


_LINE = re.compile(r":\d+\)$")


def _layer(frame: str) -> str:
    for name, needles in LAYERS:
        if any(n in frame for n in needles):
            return name
    return "other (stdlib, interpreter)"


def summarise(path: Path, top: int = 25) -> str:
    """Shares by layer (of the innermost frame in one of our layers, else the leaf) and
    the functions with the most inclusive samples."""
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        layers[_layer(frames[-1])] += count
        # a function once per stack, whatever line of it was sampled
        for function in {_LINE.sub(")", f) for f in frames}:
            inclusive[function] += count
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples", "", "| layer (leaf frame) | share |", "|---|---:|"]
    for name, n in layers.most_common():
        lines.append(f"| {name} | {n / total:.0%} |")
    lines += ["", "| function (inclusive) | share |", "|---|---:|"]
    shown = 0
    for frame, n in inclusive.most_common():
        if "(streamflow/" not in frame and "(ledger/" not in frame:
            continue  # our own code: the rest is reachable from it
        lines.append(f"| `{frame}` | {n / total:.0%} |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workflows", type=int, default=1500)
    p.add_argument(
        "--chain",
        type=int,
        metavar="STEPS",
        help="Profile W3's shape instead: one chain of STEPS steps run alone, where each "
        "hop's time goes (read worker-idle: the step thread's wall clock).",
    )
    p.add_argument(
        "--fan",
        type=int,
        metavar="WORKFLOWS",
        help="Profile W2's shape instead: WORKFLOWS workflows of root -> 10 parallel -> join.",
    )
    p.add_argument("--database-url", default=DEFAULT_PG)
    p.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "streamflow-profile"),
        help="Where the collapsed stacks go (megabytes: not for the repository).",
    )
    args = p.parse_args(argv)
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, even when not on PATH
    pyspy = str(beside) if beside.exists() else shutil.which("py-spy")
    if pyspy is None:
        p.error("py-spy is not installed: pip install -e '.[bench]'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pg = Postgres(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    recorders: list[subprocess.Popen[bytes]] = []
    if args.chain is not None and args.chain < 2:
        p.error("--chain needs at least 2 steps (a hop is between two)")
    if args.fan is not None and args.fan < 1:
        p.error("--fan needs at least 1 workflow")
    if args.chain is not None and args.fan is not None:
        p.error("choose one shape: --chain or --fan")
    if args.chain:
        workload = Workload("w3", "W3 profile", "chain", args.chain, 1)
    elif args.fan:
        workload = Workload("w2", "W2 profile", "fan", 10, args.fan)
    else:
        workload = Workload("w1", "W1 profile", "chain", 3, args.workflows)
    try:
        with disposable_redis(None) as redis:
            system = StreamflowSystem(Ctx(pg, args.database_url, redis, workdir))
            system.setup()
            original_drive = system.drive

            def drive(w: Workload) -> object:
                # attach once the processes are up, just before the workload starts
                for proc, name, flags in (
                    (system.worker, "worker", []),
                    (system.worker, "worker-idle", ["--idle"]),
                    # Only the thread holding the GIL: where the interpreter's time goes
                    # (a thread waiting in psycopg or redis-py with the GIL released is
                    # not counted, which plain CPU samples cannot always tell).
                    (system.worker, "worker-gil", ["--gil"]),
                    (system.consumer, "consume", []),
                    (system.consumer, "consume-gil", ["--gil"]),
                ):
                    cmd = [
                        pyspy,
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(out / f"{name}.txt"),
                        *flags,
                    ]
                    recorders.append(
                        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    )
                threading.Event().wait(0.5)  # py-spy attaches before the first insert
                return original_drive(w)

            system.drive = drive  # type: ignore[method-assign]
            try:
                fig = measure(system, workload, workdir / "run")
            finally:
                system.teardown()
    finally:
        for r in recorders:  # py-spy writes its file when the target exits
            try:
                r.wait(30)
            except subprocess.TimeoutExpired:
                r.terminate()
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)
    steps = workload.steps
    print(f"{workload.title}: {steps / fig.outcome.wall_s:.0f} steps/s while profiled\n")
    print_summaries(out)
    return 0


def print_summaries(out: Path) -> None:
    for name in ("worker", "worker-idle", "worker-gil", "consume", "consume-gil"):
        path = out / f"{name}.txt"
        if path.exists():
            print(summarise(path))
            print()


if __name__ == "__main__":
    raise SystemExit(main())
