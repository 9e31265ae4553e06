"""`python -m chaos`: run the chaos suite and print its report (exit 1 on any FAIL).

    python -m chaos --workflows 200 --drop 0.3 --dup 0.2 --seed 7
    python -m chaos --workflows 100 --matrix
    python -m chaos reconciler --every 0.5 --dropped-after 2     (started by the harness)

Exit codes: 0 every invariant held; 1 an invariant failed; 2 bad usage or the harness
could not run (PostgreSQL unreachable, no redis-server, a process that never started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from chaos.faults import STREAM_KINDS, FaultPlanError

if TYPE_CHECKING:
    from chaos.harness import ChaosOptions

EXIT_FAIL = 1
EXIT_USAGE = 2


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _streams(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in STREAM_KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"use a comma-separated subset of {list(STREAM_KINDS)}")
    return names


def _range_ms(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want LOW:HIGH in milliseconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"want 0 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def _script(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        target, sep, fate = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"want TARGET=FATE, got {part!r}")
        out[target.strip()] = fate.strip()
    return out


def _shapes(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parser() -> argparse.ArgumentParser:
    from chaos.harness import DEFAULT_POSTGRES_URL, ChaosOptions

    d = ChaosOptions()
    p = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Run workflows through real Streamflow processes on PostgreSQL and a "
        "disposable redis-server, once without faults and once with, and check the "
        "invariants. Prints a report; exits 1 if any invariant FAILs.",
    )
    p.add_argument("--workflows", type=int, default=d.workflows, help="workflows in the mix")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds workload and faults")
    p.add_argument("--drop", type=_rate, default=0.0, help="share of messages dropped")
    p.add_argument("--dup", type=_rate, default=0.0, help="share of messages sent twice")
    p.add_argument("--delay", type=_rate, default=0.0, help="share of messages held back")
    p.add_argument("--replay", type=_rate, default=0.0, help="share of messages sent again later")
    p.add_argument("--reorder", type=_rate, default=0.0, help="share of read batches shuffled")
    p.add_argument(
        "--streams",
        type=_streams,
        default=d.streams,
        help="streams message faults hit: completion,ready (default both)",
    )
    p.add_argument("--delay-ms", type=_range_ms, default=d.delay_ms, help="LOW:HIGH hold time")
    p.add_argument("--replay-after-ms", type=_range_ms, default=d.replay_after_ms, help="LOW:HIGH")
    p.add_argument(
        "--script",
        type=_script,
        default={},
        help="fates for particular messages, e.g. 'ready:flaky#1=replay,ready:flaky#2=drop'",
    )
    p.add_argument("--shapes", type=_shapes, default=(), help="only these shapes, e.g. retry,fan")
    p.add_argument("--kill-worker", action="store_true", help="SIGKILL a worker mid-run")
    p.add_argument(
        "--kill-consumer", action="store_true", help="SIGKILL the consumer process mid-run"
    )
    p.add_argument("--flush-redis", action="store_true", help="kill Redis, restart it empty")
    p.add_argument("--cut-postgres", action="store_true", help="pg_terminate_backend mid-run")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="steps per worker")
    p.add_argument("--lease-seconds", type=float, default=d.lease_seconds)
    p.add_argument("--reconcile-every", type=float, default=d.reconcile_every)
    p.add_argument("--redispatch-after", type=float, default=d.redispatch_after)
    p.add_argument(
        "--dropped-after",
        type=float,
        default=d.dropped_after,
        help="grace before an unconsumed completion event is declared dropped (an extra "
        "reconciler process); 0 = no extra reconciler, the engine's 30 s default",
    )
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds to converge")
    p.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a database on the server to create throwaway databases from",
    )
    p.add_argument("--redis-server", default=None, help="redis-server binary (default: PATH)")
    p.add_argument("--workdir", default=None, help="keep logs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep databases and logs")
    p.add_argument("--matrix", action="store_true", help="run every fault kind in turn")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def options_from(args: argparse.Namespace) -> ChaosOptions:
    from chaos.harness import ChaosOptions

    known = {f.name for f in fields(ChaosOptions)}
    values = {k: v for k, v in vars(args).items() if k in known}
    if values.get("dropped_after") == 0:
        values["dropped_after"] = None
    return ChaosOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reconciler"]:
        return reconciler_main(argv[1:])
    from chaos.harness import HarnessError, run_chaos, run_matrix
    from chaos.report import render_matrix

    args = parser().parse_args(argv)
    try:
        options = options_from(args)
        # Checks the rates together (they may add up to 1 at most) before any server starts.
        options.plan(log=Path(os.devnull))
    except (FaultPlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        if args.matrix:
            reports = run_matrix(options, progress=say)
            if args.json:
                print(json.dumps([r.to_dict() for r in reports], indent=2, default=str))
            else:
                print(render_matrix(reports))
            return 0 if all(r.passed for r in reports) else EXIT_FAIL
        report = run_chaos(options, progress=say)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.render())
    return 0 if report.passed else EXIT_FAIL


def reconciler_main(argv: Sequence[str]) -> int:
    """A reconciler process with a configurable `dropped_after` (see chaos/harness.py).

    Reads the same `STREAMFLOW_*` variables as `streamflow reconcile`, and is wrapped for
    chaos like every engine process when `STREAMFLOW_CHAOS` is set.
    """
    from datetime import timedelta

    from ledger.db import make_engine
    from streamflow import logs
    from streamflow.config import Settings
    from streamflow.engine.runner import Runner
    from streamflow.reconciler import Reconciler, ReconcilerConfig
    from streamflow.streams.keys import StreamKeys
    from streamflow.streams.seam import wrap_for_chaos
    from streamflow.streams.transport import connect

    p = argparse.ArgumentParser(prog="python -m chaos reconciler")
    p.add_argument("--every", type=float, default=0.5)
    p.add_argument("--dropped-after", type=float, default=2.0)
    p.add_argument("--redispatch-after", type=float, default=2.0)
    args = p.parse_args(argv)
    settings = Settings()
    if not settings.database_url or not settings.redis_url:
        print("error: set STREAMFLOW_DATABASE_URL and STREAMFLOW_REDIS_URL", file=sys.stderr)
        return EXIT_USAGE
    engine = make_engine(settings.database_url)
    transport = wrap_for_chaos(connect(settings.redis_url), settings.chaos)
    transport.ping()
    reconciler = Reconciler(
        engine,
        transport,
        StreamKeys(prefix=settings.stream_prefix),
        ReconcilerConfig(
            redispatch_after=timedelta(seconds=args.redispatch_after),
            dropped_after=timedelta(seconds=args.dropped_after),
        ),
        host=f"chaos-reconciler-{os.getpid()}",
    )
    logs.configure()
    runner = Runner()
    runner.add("reconciler", lambda stop: reconciler.run(stop, args.every))
    try:
        return runner.run_until_signalled(0)
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
