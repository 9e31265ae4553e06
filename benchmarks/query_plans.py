"""The query plans of the ledger's hot path, on a ledger big enough to matter.

Seeds a throwaway PostgreSQL database with finished workflows (10 steps each, with edges,
attempts, results, evidence, callbacks, signals, awaits, cancel requests, recoveries and
reconciler passes, as a real ledger would hold), runs ANALYZE, then drives the hot path
through the ledger's own functions — insert, dispatch, claim, renew, complete, consume,
signal, release, cancel, the `on_finish` callback, a reconciler pass, the operator's
reads and a prune batch — while recording every statement it sends. Each statement is
then EXPLAINed with its own parameters; the plan is printed with any sequential scan of a
ledger table called out.

    python -m benchmarks.query_plans                  # 5,000 workflows (50,000 steps)
    python -m benchmarks.query_plans --workflows 20000 --all-plans

`tests/integration/test_query_plans.py` asserts on the same capture.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from ledger import tables as t
from ledger.callback_jobs import claim_callback, complete_callback, dispatch_callbacks
from ledger.cancel import cancel_workflow
from ledger.claims import Claim, claim_step, release_claim, renew_lease
from ledger.consume import CompletionEventView, consume_completions
from ledger.db import make_engine, read
from ledger.explain import explain_step
from ledger.migrate import upgrade
from ledger.prune import find_prunable, prune_batch
from ledger.reads import get_results, get_workflow
from ledger.signals import record_signal
from ledger.sweeps import dispatch_undispatched
from ledger.transitions import complete_step

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STEPS_PER_WORKFLOW = 10

#: Tables that grow with the number of workflows: a sequential scan of one is a bug.
BIG_TABLES = frozenset(tbl.name for tbl in t.metadata.sorted_tables)

#: Sequential scans that are fine, and why. Keyed by table; each reason must hold for
#: every statement in which that scan appears.
ALLOWED_SEQ_SCANS: dict[str, str] = {}


@dataclass
class Captured:
    """One statement the hot path sent, with the parameters of its first execution."""

    statement: str
    parameters: Any
    #: Which step of the hot path sent it first.
    phase: str
    count: int = 1


@dataclass
class Planned:
    captured: Captured
    plan: dict[str, Any]
    #: (node type, relation, index) for every scan node in the plan.
    scans: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def seq_scans(self) -> list[str]:
        return [rel for node, rel, _ in self.scans if node == "Seq Scan"]

    @property
    def bad_seq_scans(self) -> list[str]:
        return [
            rel
            for rel in self.seq_scans
            if base_table(rel) in BIG_TABLES and base_table(rel) not in ALLOWED_SEQ_SCANS
        ]


def base_table(relation: str) -> str:
    """The ledger table a relation belongs to (partitions are named `<table>_pNN`)."""
    return re.sub(r"_p\d+$", "", relation)


# -- the seed ----------------------------------------------------------------------------


def seed(engine: Engine, workflows: int) -> None:
    """Bulk-load `workflows` finished workflows (and a running tail) in SQL, then ANALYZE."""
    wid = "lpad(to_hex(w), 32, '0')"
    # Finish times spread evenly over the last 60 days: half the ledger is past a 30-day
    # cutoff, as on a system that has run for two months without pruning.
    old = f"now() - interval '60 days' * (w::float / {workflows})"
    series = f"generate_series(1, {workflows}) w"
    steps = f"{series}, generate_series(0, {STEPS_PER_WORKFLOW - 1}) i"
    statements = [
        f"""INSERT INTO streamflow_workflows (id, name, state, outcome, semantics_version,
            context, step_count, completed_count, needs_review, created_at, updated_at,
            finished_at, on_finish)
            SELECT {wid}, 'seed', 'finished', 'completed', 2, '{{}}'::jsonb,
                   {STEPS_PER_WORKFLOW}, {STEPS_PER_WORKFLOW}, false, {old}, {old}, {old},
                   '{{"worker": "seed:Notify", "queue": "default", "args": {{}},
                      "max_attempts": 1, "priority": 0}}'::jsonb
            FROM {series}""",
        f"""INSERT INTO streamflow_steps (workflow_id, name, position, worker, queue, args,
            max_attempts, priority, state, attempt, needs_review, terminal_cause,
            available_at, dispatched_at, created_at, updated_at, finished_at)
            SELECT {wid}, 's' || i, i, 'seed:Step', 'default', '{{}}'::jsonb, 3, 0,
                   'completed', 1, false, 'completed', {old}, {old}, {old}, {old}, {old}
            FROM {steps}""",
        f"""INSERT INTO streamflow_edges (workflow_id, child, parent, policy)
            SELECT {wid}, 's' || i, 's' || (i - 1), 'cancel'
            FROM {series}, generate_series(1, {STEPS_PER_WORKFLOW - 1}) i""",
        f"""INSERT INTO streamflow_attempts (workflow_id, step, attempt, status, payload,
            source, recorded_at)
            SELECT {wid}, 's' || i, 1, 'completed', '1'::jsonb, 'worker', {old}
            FROM {steps}""",
        f"""INSERT INTO streamflow_results (workflow_id, step, attempt, payload, recorded_at)
            SELECT {wid}, 's' || i, 1, '1'::jsonb, {old} FROM {steps}""",
        f"""INSERT INTO streamflow_evidence (workflow_id, step, kind, classification, source,
            status, attempt, dedupe_key, created_at)
            SELECT {wid}, 's' || i, 'event', 'consumed', 'consumer', 'completed', 1,
                   {wid} || '\\:s' || i || '\\:1\\:completed', {old}
            FROM {steps}""",
        f"""INSERT INTO streamflow_callbacks (workflow_id, worker, queue, args, max_attempts,
            state, attempt, workflow_outcome, counters, terminal_cause, dispatched_at,
            created_at, updated_at, finished_at)
            SELECT {wid}, 'seed:Notify', 'default', '{{}}'::jsonb, 1, 'completed', 1,
                   'completed', '{{}}'::jsonb, 'completed', {old}, {old}, {old}, {old}
            FROM {series}""",
        f"""INSERT INTO streamflow_callback_attempts (workflow_id, attempt, status, source,
            recorded_at)
            SELECT {wid}, 1, 'completed', 'worker', {old} FROM {series}""",
        f"""INSERT INTO streamflow_signals (workflow_id, name, step, classification, source,
            created_at, consumed_at)
            SELECT {wid}, 'go', 's5', 'consumed', 'api', {old}, {old}
            FROM {series} WHERE w % 2 = 0""",
        """INSERT INTO streamflow_awaits (workflow_id, step, signal, state, signal_id,
            activated_at, resolved_at)
            SELECT sg.workflow_id, 's5', 'go', 'satisfied', sg.id, sg.created_at,
                   sg.created_at
            FROM streamflow_signals sg""",
        f"""INSERT INTO streamflow_cancel_requests (workflow_id, reason, created_at, effect,
            workflow_outcome)
            SELECT {wid}, 'seeded', {old}, 'finished', 'completed'
            FROM {series} WHERE w % 2 = 1""",
        f"""INSERT INTO streamflow_recoveries (workflow_id, step, repair, reason, created_at)
            SELECT {wid}, 's1', 'redispatch', 'seeded', {old}
            FROM {series}""",
        f"""INSERT INTO streamflow_reconciler_passes (host, started_at, finished_at, summary)
            SELECT 'seed', {old}, {old}, '{{}}'::jsonb FROM {series}""",
        # The newest pass a minute ago, as a reconciler running every few seconds leaves:
        # the next pass looks only at what changed since.
        """INSERT INTO streamflow_reconciler_passes (host, started_at, finished_at, summary)
            VALUES ('seed', now() - interval '1 minute', now() - interval '1 minute',
                    '{}'::jsonb)""",
    ]
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


# -- the capture ---------------------------------------------------------------------------


_DML = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


class Recorder:
    """Every SQL statement an engine sends while `phase(...)` is active."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: dict[str, Captured] = {}
        self.current = "setup"

    def _listen(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if not _DML.match(statement):
            return
        seen = self.statements.get(statement)
        if seen is not None:
            seen.count += 1
            return
        first = parameters[0] if executemany and parameters else parameters
        self.statements[statement] = Captured(statement, first, self.current)

    @contextmanager
    def recording(self) -> Iterator[Recorder]:
        event.listen(self.engine, "before_cursor_execute", self._listen)
        try:
            yield self
        finally:
            event.remove(self.engine, "before_cursor_execute", self._listen)

    def phase(self, name: str, fn: Callable[[Connection], Any]) -> Any:
        self.current = name
        with self.engine.begin() as conn:
            return fn(conn)


def _event(claim: Claim, status: str = "completed") -> CompletionEventView:
    key = f"{claim.workflow_id}:{claim.step}:{claim.attempt}:{status}"
    return CompletionEventView(claim.workflow_id, claim.step, status, claim.attempt, key)


def run_hot_path(engine: Engine) -> list[Captured]:
    """Drive one workflow (and a cancelled one) through everything the engine does, plus a
    reconciler pass, the operator's reads and a prune batch; return what was sent."""
    # Imported here: `streamflow` sits above `ledger`, and only this driver needs it.
    from streamflow.builder import Workflow
    from streamflow.reconciler import Reconciler
    from streamflow.streams.keys import StreamKeys
    from tests.workers import Noop

    rec = Recorder(engine)
    now = datetime.now(UTC)
    lease = 30.0
    wf = (
        Workflow.new(name="planned", workflow_context={"n": 1}, on_finish=Noop.new({}))
        .add("a", Noop.new({}))
        .add("b", Noop.new({"a": Workflow.result("a")}), deps=["a"], await_signal="go")
        .add("c", Noop.new({}), deps=["a"])
    )
    with rec.recording():
        rec.current = "insert"
        wid = Workflow.insert(wf, engine).id
        rec.phase("dispatch", lambda c: dispatch_undispatched(c, now))
        a = rec.phase(
            "claim", lambda c: claim_step(c, wid, "a", owner="w1", lease_seconds=lease, now=now)
        )
        assert isinstance(a, Claim)
        rec.phase(
            "renew",
            lambda c: renew_lease(
                c, wid, "a", owner="w1", attempt=a.attempt, lease_seconds=lease, now=now
            ),
        )
        rec.phase(
            "complete",
            lambda c: complete_step(
                c, wid, "a", "completed", {"x": 1}, attempt=a.attempt, source="worker", now=now
            ),
        )
        rec.phase("consume", lambda c: consume_completions(c, [_event(a)], now, "consumer"))
        rec.phase("consume", lambda c: consume_completions(c, [_event(a)], now, "consumer"))
        rec.phase("signal", lambda c: record_signal(c, wid, "go", {"ok": True}, now=now))
        rec.phase("dispatch", lambda c: dispatch_undispatched(c, now))
        b = rec.phase(
            "claim", lambda c: claim_step(c, wid, "b", owner="w1", lease_seconds=lease, now=now)
        )
        assert isinstance(b, Claim)
        rec.phase(
            "release",
            lambda c: release_claim(c, wid, "b", owner="w1", attempt=b.attempt, now=now),
        )
        for step in ("b", "c"):
            claim = rec.phase(
                "claim",
                lambda c, s=step: claim_step(c, wid, s, owner="w2", lease_seconds=lease, now=now),
            )
            assert isinstance(claim, Claim)
            rec.phase(
                "complete",
                lambda c, k=claim: complete_step(
                    c, wid, k.step, "completed", None, attempt=k.attempt, source="worker", now=now
                ),
            )
            rec.phase(
                "consume", lambda c, k=claim: consume_completions(c, [_event(k)], now, "consumer")
            )
        rec.phase("dispatch", lambda c: dispatch_callbacks(c, now))
        cb = rec.phase(
            "callback", lambda c: claim_callback(c, wid, owner="w3", lease_seconds=lease, now=now)
        )
        assert isinstance(cb, Claim)
        rec.phase(
            "callback",
            lambda c: complete_callback(c, wid, payload=None, attempt=cb.attempt, now=now),
        )
        rec.current = "insert"
        chain = (
            Workflow.new(name="handed")
            .add("x", Noop.new({}))
            .add("y", Noop.new({"x": Workflow.result("x")}), deps=["x"])
        )
        handed = Workflow.insert(chain, engine).id
        x = rec.phase(
            "claim", lambda c: claim_step(c, handed, "x", owner="w1", lease_seconds=lease, now=now)
        )
        assert isinstance(x, Claim)
        rec.phase("hand-off", lambda c: _hand_off(c, x, lease, now))
        rec.current = "cancel"
        other = Workflow.insert(wf, engine).id
        rec.phase("cancel", lambda c: cancel_workflow(c, other, reason="plans", now=now))
        rec.current = "reconcile"
        Reconciler(engine, None, StreamKeys(), host="plans").run_pass()
        rec.current = "read"
        with read(engine) as conn:
            get_workflow(conn, wid)
            get_results(conn, wid)
            explain_step(conn, wid, "b")
        cutoff = now - timedelta(days=30)
        # A batch as small beside this ledger as the default 500 is beside a big one:
        # the planner weighs an IN list against the table's size.
        rec.phase("prune", lambda c: find_prunable(c, cutoff, 10))
        rec.phase("prune", lambda c: prune_batch(c, cutoff, 10))
    return list(rec.statements.values())


def _hand_off(conn: Connection, parent: Claim, lease: float, now: datetime) -> None:
    """The worker's hand-off: the outcome releases the child and, in the same statement,
    claims it for the worker (`ledger.planned_outcome`)."""
    done = complete_step(
        conn,
        parent.workflow_id,
        parent.step,
        "completed",
        1,
        attempt=parent.attempt,
        source="worker",
        now=now,
        dispatch=True,
        hand_off_queues=(parent.queue,),
        hand_off_owner="w1",
        hand_off_lease_seconds=lease,
    )
    child = done.hand_off_claim
    assert isinstance(child, Claim) and child.args == {"x": 1}


# -- the plans -------------------------------------------------------------------------------


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _index_of(node: dict[str, Any]) -> str | None:
    """The index a scan reads; for a bitmap heap scan, those its bitmap index scans read."""
    if node["Node Type"] == "Bitmap Heap Scan":
        names = [n["Index Name"] for n in _walk(node) if n["Node Type"] == "Bitmap Index Scan"]
        return "bitmap: " + " + ".join(names)
    return node.get("Index Name")


def explain_all(
    engine: Engine, captured: list[Captured], *, generic: bool = False
) -> list[Planned]:
    """EXPLAIN (not ANALYZE: nothing runs) each statement with its recorded parameters.

    `generic`: the plan PostgreSQL runs once the statement is prepared and its plan
    cached, which psycopg does from a connection's fifth execution of the same text and
    the server then keeps whenever it looks no dearer. That plan cannot know a
    parameter's value, so a partial index (`WHERE state = 'available'`) serves it only
    if the statement names the state as a literal.
    """
    out = []
    with engine.connect() as conn:
        for c in captured:
            plan = _generic_plan(conn, c) if generic else _custom_plan(conn, c)
            scans = [
                (n["Node Type"], n["Relation Name"], _index_of(n))
                for n in _walk(plan)
                if "Relation Name" in n
            ]
            out.append(Planned(c, plan, scans))
        conn.rollback()
    return out


def _custom_plan(conn: Connection, c: Captured) -> dict[str, Any]:
    row = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + c.statement, c.parameters)
    plan: dict[str, Any] = row.scalar_one()[0]["Plan"]
    return plan


def _generic_plan(conn: Connection, c: Captured) -> dict[str, Any]:
    """PREPARE the statement (named parameters become $1, $2, ... in order of first use)
    and EXPLAIN its EXECUTE with plan_cache_mode forcing the cached, generic plan."""
    if not isinstance(c.parameters, dict):
        raise TypeError(f"expected named parameters, got {type(c.parameters).__name__}")
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "%"  # pyformat's escaped percent sign
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s|%%", number, c.statement)
    driver = conn.connection.dbapi_connection
    assert isinstance(driver, psycopg.Connection)
    with psycopg.ClientCursor(driver) as cur:  # EXECUTE takes its arguments as literals
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute(f"PREPARE streamflow_plan_probe AS {sql}")
        try:
            args = ", ".join(["%s"] * len(names))
            cur.execute(
                f"EXPLAIN (FORMAT JSON) EXECUTE streamflow_plan_probe({args})"
                if names
                else "EXPLAIN (FORMAT JSON) EXECUTE streamflow_plan_probe",
                [c.parameters[n] for n in names],
            )
            row = cur.fetchone()
            assert row is not None
            plan: dict[str, Any] = row[0][0]["Plan"]
        finally:
            cur.execute("DEALLOCATE streamflow_plan_probe")
            cur.execute("RESET plan_cache_mode")
    return plan


def explain_text(engine: Engine, captured: Captured) -> str:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN " + captured.statement, captured.parameters)
        lines = [r[0] for r in rows]
        conn.rollback()
    return "\n".join(lines)


def _one_line(sql: str, width: int = 110) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def shorten(sql: str, width: int = 160) -> str:
    """The statement with its column lists, casts and parameter names left out: what it
    reads and by which condition is what a plan is about."""
    flat = " ".join(sql.split())
    flat = re.sub(r"%\(\w+\)s", "?", flat)
    flat = re.sub(r"::(TIMESTAMP WITH TIME ZONE|[A-Z]+)", "", flat)
    flat = re.sub(r"\bstreamflow_(\w+)\.", "", flat)  # table-qualified columns
    flat = re.sub(r"^SELECT (DISTINCT )?.+? FROM ", r"SELECT \1… FROM ", flat)
    flat = re.sub(r"^INSERT INTO (\w+) \(.*", r"INSERT INTO \1 …", flat)
    flat = re.sub(r" SET .+? WHERE ", " SET … WHERE ", flat)
    flat = re.sub(r"IN \(\?(, \?)+\)", "IN (?, …)", flat)
    return _one_line(flat, width)


def _how(node: str, index: str | None) -> str:
    if node == "Seq Scan":
        return "SEQ SCAN"
    return index or node.lower()


def report(engine: Engine, planned: list[Planned], all_plans: bool) -> str:
    lines = []
    for p in planned:
        scans = ", ".join(
            f"{rel} ({_how(node, idx)})" for node, rel, idx in p.scans if node != "ModifyTable"
        )
        flag = "  <-- SEQ SCAN" if p.bad_seq_scans else ""
        lines.append(f"[{p.captured.phase}] x{p.captured.count} {shorten(p.captured.statement)}")
        lines.append(f"    reads: {scans or 'nothing (a plain insert)'}{flag}")
        if all_plans or p.bad_seq_scans:
            for plan_line in explain_text(engine, p.captured).splitlines():
                lines.append("      " + _one_line(plan_line, 150))
    bad = sum(1 for p in planned if p.bad_seq_scans)
    lines.append("")
    lines.append(
        f"{len(planned)} distinct statements; {bad} with a sequential scan of a ledger table."
    )
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server at `admin_url`, migrated; dropped afterwards."""
    base = make_url(admin_url).set(drivername="postgresql+psycopg")
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"streamflow_plans_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=5000, help="finished workflows to seed")
    parser.add_argument(
        "--url",
        default=os.environ.get("STREAMFLOW_TEST_POSTGRES_URL", DEFAULT_URL),
        help="a PostgreSQL server where a throwaway database may be created",
    )
    parser.add_argument("--all-plans", action="store_true", help="print every plan in full")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = parser.parse_args(argv)
    with throwaway_database(args.url) as url:
        engine = make_engine(url)
        try:
            seed(engine, args.workflows)
            planned = explain_all(engine, run_hot_path(engine))
            if args.json:
                out = [
                    {
                        "phase": p.captured.phase,
                        "statement": " ".join(p.captured.statement.split()),
                        "scans": p.scans,
                        "plan": p.plan,
                    }
                    for p in planned
                ]
                sys.stdout.write(json.dumps(out, indent=2) + "\n")
            else:
                print(
                    f"Ledger seeded with {args.workflows} finished workflows "
                    f"({args.workflows * STEPS_PER_WORKFLOW} steps), ANALYZEd.\n"
                )
                print(report(engine, planned, args.all_plans))
        finally:
            engine.dispose()
    return 1 if any(p.bad_seq_scans for p in planned) else 0


if __name__ == "__main__":
    raise SystemExit(main())
