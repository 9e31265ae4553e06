"""What `streamflow demo` does: real workflows, run end to end by an in-process engine.

The demo inserts a handful of small workflows and starts the engine `streamflow run`
starts — a worker for the demo's queues, a completion consumer, the maintenance loop with
its dispatcher, and the reconciler — all in this process, then watches the ledger until
every workflow has finished. Nothing is simulated: each step is dispatched to a ready
stream, claimed in the ledger, performed by one of the `Worker` classes below, and its
outcome recorded and published. Afterwards it reads back what the ledger kept — results,
attempts, cancel causes, evidence — and reports one outcome again by hand to show how a
duplicate and a conflicting report are classified.

The demo's workers take steps only from their own queues (`demo`, `demo-billing`, ...),
so a demo run never claims a step of your own workflows in the same database.

This module returns plain data (`Progress`, `DemoReport`); `streamflow.render` draws it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from ledger import tables as t
from ledger.db import read
from ledger.placeholders import resolve
from streamflow.builder import Dep, Workflow
from streamflow.engine.consumer import CompletionConsumer
from streamflow.engine.context import StepContext
from streamflow.engine.launch import EngineOptions, build_runner
from streamflow.engine.maintenance import Maintenance
from streamflow.engine.worker_runtime import WorkerRuntime
from streamflow.explain import Explain, StepExplanation
from streamflow.logs import log_event
from streamflow.render import StepView, step_views
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import StreamTransport
from streamflow.worker import Worker

#: How long the demo waits for its workflows before giving up.
DEFAULT_TIMEOUT_SECONDS = 60.0
#: How often the live view re-reads the ledger.
POLL_SECONDS = 0.2


class DemoError(Exception):
    """The demo could not finish: its workflows timed out or the engine failed."""


# -- demo workers: small real work, a few tens of milliseconds each -------------------------


def _pause(seconds: float = 0.04) -> None:
    # Long enough for the live view to catch a step running, short enough not to bore.
    time.sleep(seconds)


class FetchCustomer(Worker):
    queue = "demo"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        account = int(args["account_id"])
        return {
            "customer_id": account,
            "email": f"customer{account}@example.com",
            "plan": "pro" if account % 2 == 0 else "basic",
        }


class SyncBilling(Worker):
    queue = "demo-billing"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        # `customer` was Workflow.result("fetch_customer"): the worker sees the stored result.
        customer = args["customer"]
        return {
            "invoice_id": f"inv_{customer['customer_id']:04d}",
            "billed_to": customer["email"],
            "amount_cents": 4900 if customer["plan"] == "pro" else 1900,
        }


class Cleanup(Worker):
    queue = "demo"
    max_attempts = 5

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause(0.02)
        # Reached through a `continue` edge: it runs however its dependency ended.
        return {"temp_files_removed": 3, "dependency_results_seen": sorted(ctx.results)}


class LoadOrders(Worker):
    queue = "demo"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        orders = {
            region: [100 + (i * 37 + k * 53) % 400 for i in range(4 + k)]
            for k, region in enumerate(args["regions"])
        }
        return {"month": args["month"], "orders": orders}


class SummarizeRegion(Worker):
    queue = "demo-reports"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause(0.06)
        amounts = args["loaded"]["orders"][args["region"]]
        return {"region": args["region"], "orders": len(amounts), "revenue": sum(amounts)}


class MergeReports(Worker):
    queue = "demo-reports"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        summaries = list(args["summaries"].values())
        top = max(summaries, key=lambda s: s["revenue"])
        return {
            "regions": len(summaries),
            "orders": sum(s["orders"] for s in summaries),
            "revenue": sum(s["revenue"] for s in summaries),
            "top_region": top["region"],
        }


class ChargeCard(Worker):
    queue = "demo-payments"
    max_attempts = 1

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        raise RuntimeError(f"card declined for {args['amount_cents']} cents")


class SendReceipt(Worker):
    queue = "demo-emails"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        return {"sent": True}


class ArchiveReceipt(Worker):
    queue = "demo"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        return {"archived": True}


class ReleaseHold(Worker):
    queue = "demo-payments"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        return {"hold_released": True, "order_id": args["order_id"]}


class FetchRates(Worker):
    """Fails its first attempt, as a flaky API would; the retry succeeds."""

    queue = "demo"
    max_attempts = 3

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        if ctx.attempt == 1:
            raise TimeoutError("rates API timed out")
        return {"base": "USD", "rates": {"EUR": 0.92, "GBP": 0.79}}


class ConvertPrices(Worker):
    queue = "demo"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        rates = args["rates"]["rates"]
        return {
            sku: {cur: round(usd * rate, 2) for cur, rate in sorted(rates.items())}
            for sku, usd in sorted(args["prices_usd"].items())
        }


class PublishPrices(Worker):
    queue = "demo"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause(0.02)
        return {"published": len(args["prices"])}


class IssueInvoice(Worker):
    queue = "demo-billing"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause()
        return {"invoice_id": f"inv_{args['customer_id']:04d}", "total_cents": 12500}


class EmailInvoice(Worker):
    queue = "demo-emails"

    def perform(self, args: dict[str, Any], ctx: StepContext) -> object:
        _pause(0.02)
        return {"sent": True, "invoice_id": args["invoice"]["invoice_id"]}


WORKERS: tuple[type[Worker], ...] = (
    FetchCustomer,
    SyncBilling,
    Cleanup,
    LoadOrders,
    SummarizeRegion,
    MergeReports,
    ChargeCard,
    SendReceipt,
    ArchiveReceipt,
    ReleaseHold,
    FetchRates,
    ConvertPrices,
    PublishPrices,
    IssueInvoice,
    EmailInvoice,
)

#: Every queue a demo worker uses: the demo's engine takes steps from these only.
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(w.queue for w in WORKERS))


# -- the demo workflows ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Definition:
    key: str
    title: str
    #: What to look at, in a sentence or two.
    summary: str
    workflow: Workflow


REGIONS = ("eu", "us", "apac", "latam")


def definitions() -> list[Definition]:
    sync = (
        Workflow.new("sync_customer", {"account_id": 42})
        .add("fetch_customer", FetchCustomer.new({"account_id": 42}))
        .add(
            "sync_billing",
            SyncBilling.new({"account_id": 42, "customer": Workflow.result("fetch_customer")}),
            deps=["fetch_customer"],
        )
        .add(
            "cleanup",
            Cleanup.new({"account_id": 42}),
            deps=[Dep("sync_billing", policy="continue")],
        )
    )

    fan = Workflow.new("regional_report", {"month": "2026-11"}).add(
        "load_orders", LoadOrders.new({"month": "2026-11", "regions": list(REGIONS)})
    )
    for region in REGIONS:
        fan = fan.add(
            f"summarize_{region}",
            SummarizeRegion.new({"region": region, "loaded": Workflow.result("load_orders")}),
            deps=["load_orders"],
        )
    fan = fan.add(
        "merge_reports",
        MergeReports.new({"summaries": {r: Workflow.result(f"summarize_{r}") for r in REGIONS}}),
        deps=[f"summarize_{r}" for r in REGIONS],
    )

    checkout = (
        Workflow.new("checkout", {"order_id": "ord_77"})
        .add("charge_card", ChargeCard.new({"order_id": "ord_77", "amount_cents": 4999}))
        .add("send_receipt", SendReceipt.new({"order_id": "ord_77"}), deps=["charge_card"])
        .add("archive_receipt", ArchiveReceipt.new({"order_id": "ord_77"}), deps=["send_receipt"])
        .add(
            "release_hold",
            ReleaseHold.new({"order_id": "ord_77"}),
            deps=[Dep("charge_card", policy="continue")],
        )
    )

    prices = (
        Workflow.new("price_update", {"currency": "EUR"})
        .add("fetch_rates", FetchRates.new({"base": "USD"}))
        .add(
            "convert_prices",
            ConvertPrices.new(
                {
                    "prices_usd": {"sku_1": 10.0, "sku_2": 24.5, "sku_3": 99.0},
                    "rates": Workflow.result("fetch_rates"),
                }
            ),
            deps=["fetch_rates"],
        )
        .add(
            "publish_prices",
            PublishPrices.new({"prices": Workflow.result("convert_prices")}),
            deps=["convert_prices"],
        )
    )

    invoice = (
        Workflow.new("send_invoice", {"customer_id": 7})
        .add("issue_invoice", IssueInvoice.new({"customer_id": 7}))
        .add(
            "email_invoice",
            EmailInvoice.new({"invoice": Workflow.result("issue_invoice")}),
            deps=["issue_invoice"],
        )
    )

    return [
        Definition(
            "customer_sync",
            "Customer sync",
            "fetch_customer -> sync_billing (its args hold Workflow.result('fetch_customer')) "
            "-> cleanup, through a `continue` edge: it runs however sync_billing ends.",
            sync,
        ),
        Definition(
            "fan_out",
            "Fan-out / fan-in",
            f"load_orders releases {len(REGIONS)} summaries at once; merge_reports waits for "
            "all of them and is released exactly once, by the last to finish.",
            fan,
        ),
        Definition(
            "failure",
            "A failure cascades; cleanup still runs",
            "charge_card fails (one attempt allowed): send_receipt (cancel edge) and its "
            "child archive_receipt are cancelled; release_hold (continue edge) still runs.",
            checkout,
        ),
        Definition(
            "retry",
            "A flaky step, retried",
            "fetch_rates times out on attempt 1; the retry, scheduled about a second later "
            "with exponential backoff, succeeds. Its descendants wait meanwhile.",
            prices,
        ),
        Definition(
            "evidence",
            "Duplicate and conflicting reports are kept as evidence",
            "issue_invoice -> email_invoice, run by the engine like the others; afterwards "
            "the demo reports issue_invoice's outcome again, by hand.",
            invoice,
        ),
    ]


#: The step the demo explains at the end: (workflow key, step).
EXPLAINED = ("failure", "archive_receipt")
#: The flaky step whose attempts the demo shows: (workflow key, step).
FLAKY = ("retry", "fetch_rates")
#: The step that fails for good: (workflow key, step).
FAILING = ("failure", "charge_card")
#: The step whose outcome the demo replays by hand: (workflow key, step).
REPLAYED = ("evidence", "issue_invoice")


# -- what the demo observes and reports ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowView:
    """One demo workflow as the ledger has it at one moment."""

    key: str
    title: str
    workflow_id: str
    workflow_name: str
    state: str
    outcome: str | None
    needs_review: bool
    steps: tuple[StepView, ...]

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "workflow_id": self.workflow_id,
            "workflow_name": self.workflow_name,
            "state": self.state,
            "outcome": self.outcome,
            "needs_review": self.needs_review,
            "steps": [s.to_dict() for s in self.steps],
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """Every demo workflow, read from the ledger `elapsed` seconds after the engine started."""

    elapsed: float
    workflows: tuple[WorkflowView, ...]

    @property
    def finished(self) -> int:
        return sum(1 for w in self.workflows if w.finished)

    @property
    def done(self) -> bool:
        return self.finished == len(self.workflows)


@dataclass(frozen=True, slots=True)
class Report:
    """One outcome reported by hand, and what the ledger made of it."""

    step: str
    status: str
    payload: Any
    #: How the ledger classified it: applied, duplicate, late, ambiguous.
    classification: str
    released: tuple[str, ...]
    cancelled: tuple[str, ...]
    workflow_outcome: str | None
    reason: str | None
    #: Why the demo sent it, in a few words.
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "payload": self.payload,
            "classification": self.classification,
            "released": list(self.released),
            "cancelled": list(self.cancelled),
            "workflow_outcome": self.workflow_outcome,
            "reason": self.reason,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recorded attempt of a step (the ledger's attempt history)."""

    attempt: int
    status: str
    payload: Any
    reason: str | None
    source: str
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "status": self.status,
            "payload": self.payload,
            "reason": self.reason,
            "source": self.source,
            "recorded_at": self.recorded_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Evidence:
    """One evidence row the ledger kept about a step."""

    kind: str
    classification: str
    source: str
    status: str | None
    attempt: int | None
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class DemoWorkflow:
    key: str
    title: str
    summary: str
    #: (parent, child, policy) for every edge, in definition order.
    edges: list[tuple[str, str, str]]
    final: WorkflowView
    results: dict[str, Any]

    @property
    def workflow_id(self) -> str:
        return self.final.workflow_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "summary": self.summary,
            "workflow_id": self.final.workflow_id,
            "workflow_name": self.final.workflow_name,
            "edges": [{"parent": p, "child": c, "policy": pol} for p, c, pol in self.edges],
            "state": self.final.state,
            "outcome": self.final.outcome,
            "needs_review": self.final.needs_review,
            "steps": [s.to_dict() for s in self.final.steps],
            "results": self.results,
        }


@dataclass(slots=True)
class DemoReport:
    #: Where the engine's streams lived, in words.
    streams: str
    queues: tuple[str, ...]
    #: When the engine started (wall clock, UTC).
    started_at: datetime
    #: Seconds from starting the engine until every demo workflow had finished.
    elapsed: float
    #: How many times the demo read the ledger while the engine ran.
    polls: int
    workflows: list[DemoWorkflow]
    #: sync_billing's args as stored (with the placeholder) and as resolved for its worker.
    args_stored: dict[str, Any]
    args_resolved: dict[str, Any]
    #: (workflow key, step, cancelled by step, root cause step) for every cancelled step.
    cancelled: list[tuple[str, str, str | None, str | None]]
    flaky_step: str
    attempts: list[Attempt]
    failed_step: str
    failed_attempts: list[Attempt]
    replayed_step: str
    replay: list[Report]
    #: The ledger's evidence rows for the replayed step, oldest first.
    evidence: list[Evidence]
    explained: StepExplanation
    #: What each engine component counted (`.stats`), by component.
    engine: dict[str, dict[str, int]]
    #: Warnings and errors the engine logged while the demo ran.
    log: list[LogLine] = field(default_factory=list)

    def workflow(self, key: str) -> DemoWorkflow:
        return next(w for w in self.workflows if w.key == key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "queues": list(self.queues),
            "started_at": self.started_at.isoformat(),
            "elapsed_seconds": round(self.elapsed, 3),
            "polls": self.polls,
            "workflows": [w.to_dict() for w in self.workflows],
            "customer_sync": {
                "sync_billing_args_stored": self.args_stored,
                "sync_billing_args_resolved": self.args_resolved,
            },
            "cancelled": [
                {"workflow": key, "step": step, "cancelled_by": by, "root_cause": root}
                for key, step, by, root in self.cancelled
            ],
            "retry": {"step": self.flaky_step, "attempts": [a.to_dict() for a in self.attempts]},
            "failure": {
                "step": self.failed_step,
                "attempts": [a.to_dict() for a in self.failed_attempts],
            },
            "replay": {
                "step": self.replayed_step,
                "reports": [r.to_dict() for r in self.replay],
                "evidence": [e.to_dict() for e in self.evidence],
            },
            "explain": self.explained.to_dict(),
            "engine": self.engine,
            "engine_log": [line.to_dict() for line in self.log],
        }


# -- running it ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Inserted:
    definition: Definition
    workflow_id: str


def run_demo(
    engine: Engine,
    transport: StreamTransport,
    keys: StreamKeys,
    *,
    streams: str = "an in-process stream",
    on_progress: Callable[[Progress], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    poll_seconds: float = POLL_SECONDS,
) -> DemoReport:
    """Insert the demo workflows on `engine` (a migrated ledger), run them through an
    in-process engine on `transport` until all have finished, and report what happened.

    `on_progress` is called with every reading of the ledger while the engine runs (the
    CLI draws its live view with it). Raises DemoError if the workflows have not finished
    within `timeout` seconds or an engine component fails; the engine is stopped either way.
    """
    runner, components = build_runner(
        engine,
        transport,
        keys,
        EngineOptions(
            queues=QUEUES,
            concurrency=8,
            consumer=True,
            maintenance=True,
            # The reconciler too, as in `streamflow run`. With redispatch_after at 5 s it
            # also rescues a demo step that another process on the same database (say a
            # `streamflow run` with its own in-process stream) dispatched where this
            # process's worker cannot see it.
            reconcile_every=5.0,
            redispatch_after_seconds=5.0,
            drain_seconds=5.0,
        ),
    )
    with _captured_logs() as log:
        inserted = [_Inserted(d, Workflow.insert(d.workflow, engine).id) for d in definitions()]
        started_at = datetime.now(UTC)
        started = time.monotonic()
        runner.start()
        polls = 0
        try:
            while True:
                progress = _observe(engine, inserted, time.monotonic() - started)
                polls += 1
                if on_progress is not None:
                    on_progress(progress)
                if progress.done:
                    break
                if runner.failed:
                    raise DemoError(
                        f"the engine's {', '.join(runner.failed)} stopped with an error"
                        + _last_error(log)
                    )
                if progress.elapsed > timeout:
                    raise DemoError(
                        f"the demo workflows did not finish within {timeout:g} s; "
                        f"unfinished: {_unfinished(progress)}"
                    )
                runner.stop.wait(poll_seconds)
            elapsed = progress.elapsed
            _settle(components)
        finally:
            runner.stop.set()
            stopped = runner.join(15.0)
        if not stopped:
            raise DemoError("the demo's engine did not stop within 15 s")
        _trim(components)
        logged = list(log.lines)
    engine_stats = _stats(components)

    by_key = {i.definition.key: i for i in inserted}
    workflows = [_final(engine, i) for i in inserted]
    by_wf = {w.key: w for w in workflows}

    sync = by_key["customer_sync"]
    args_stored = Workflow.get(engine, sync.workflow_id).steps["sync_billing"].args
    args_resolved, _missing = resolve(args_stored, by_wf["customer_sync"].results)

    cancelled = [
        (w.key, s.name, s.cancelled_by_step, s.cancel_root_step)
        for w in workflows
        for s in w.final.steps
        if s.state == "cancelled"
    ]

    flaky_key, flaky_step = FLAKY
    attempts = _attempts(engine, by_key[flaky_key].workflow_id, flaky_step)
    failing_key, failed_step = FAILING
    failed_attempts = _attempts(engine, by_key[failing_key].workflow_id, failed_step)

    replay_key, replay_step = REPLAYED
    replay_id = by_key[replay_key].workflow_id
    replay = _replay(engine, replay_id, replay_step, by_wf[replay_key].results[replay_step])
    by_wf[replay_key] = _final(engine, by_key[replay_key])
    workflows = [by_wf[w.key] for w in workflows]
    evidence = _evidence(engine, replay_id, replay_step)

    explained_key, explained_step = EXPLAINED
    explained = Explain.workflow_step(
        by_key[explained_key].workflow_id, explained_step, repo=engine
    )
    return DemoReport(
        streams=streams,
        queues=QUEUES,
        started_at=started_at,
        elapsed=elapsed,
        polls=polls,
        workflows=workflows,
        args_stored=args_stored,
        args_resolved=args_resolved,
        cancelled=cancelled,
        flaky_step=flaky_step,
        attempts=attempts,
        failed_step=failed_step,
        failed_attempts=failed_attempts,
        replayed_step=replay_step,
        replay=replay,
        evidence=evidence,
        explained=explained,
        engine=engine_stats,
        log=logged,
    )


def _view(engine: Engine, inserted: _Inserted) -> tuple[WorkflowView, dict[str, Any]]:
    record = Workflow.get(engine, inserted.workflow_id)
    results = Workflow.results(engine, inserted.workflow_id)
    view = WorkflowView(
        key=inserted.definition.key,
        title=inserted.definition.title,
        workflow_id=record.id,
        workflow_name=record.name,
        state=record.state,
        outcome=record.outcome,
        needs_review=record.needs_review,
        steps=tuple(step_views(record, set(results))),
    )
    return view, results


def _observe(engine: Engine, inserted: list[_Inserted], elapsed: float) -> Progress:
    return Progress(elapsed, tuple(_view(engine, i)[0] for i in inserted))


def _final(engine: Engine, inserted: _Inserted) -> DemoWorkflow:
    view, results = _view(engine, inserted)
    d = inserted.definition
    return DemoWorkflow(
        key=d.key,
        title=d.title,
        summary=d.summary,
        edges=[(dep.step, s.name, dep.policy) for s in d.workflow.steps for dep in s.deps],
        final=view,
        results=results,
    )


def _unfinished(progress: Progress) -> str:
    parts = []
    for w in progress.workflows:
        if w.finished:
            continue
        waiting = ", ".join(f"{s.name} {s.state}" for s in w.steps if s.label != "Done")
        parts.append(f"{w.workflow_name} ({waiting})")
    return "; ".join(parts)


def _settle(components: list[object], timeout: float = 2.0) -> None:
    """Give the completion consumer a moment to take the last events, so the engine's
    counts add up: every outcome the worker recorded was also consumed."""
    worker = next((c for c in components if isinstance(c, WorkerRuntime)), None)
    consumer = next((c for c in components if isinstance(c, CompletionConsumer)), None)
    if worker is None or consumer is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w, c = worker.stats, consumer.stats
        recorded = w.completed + w.retried + w.failed + w.cancelled
        seen = c.consumed + c.duplicate + c.late + c.unmatched + c.dead_lettered
        if seen >= recorded:
            return
        time.sleep(0.02)


def _trim(components: list[object]) -> None:
    """Trim what the engine acknowledged from the streams (the maintenance loop does it
    only every half minute), so a demo on a real Redis leaves no entries behind."""
    for c in components:
        if isinstance(c, Maintenance):
            try:
                c.trim()
            except Exception as exc:
                log_event("demo.trim_failed", logging.WARNING, error=str(exc)[:200])


def _stats(components: list[object]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in components:
        if isinstance(c, WorkerRuntime):
            out["worker"] = dataclasses.asdict(c.stats)
        elif isinstance(c, CompletionConsumer):
            out["consumer"] = dataclasses.asdict(c.stats)
        elif isinstance(c, Maintenance):
            out["maintenance"] = dataclasses.asdict(c.stats)
    return out


def _attempts(engine: Engine, workflow_id: str, step: str) -> list[Attempt]:
    a = t.attempts
    with read(engine) as conn:
        rows = conn.execute(
            select(a.c.attempt, a.c.status, a.c.payload, a.c.reason, a.c.source, a.c.recorded_at)
            .where(a.c.workflow_id == workflow_id, a.c.step == step)
            .order_by(a.c.attempt)
        ).all()
    return [
        Attempt(r.attempt, r.status, _trim_payload(r.payload), r.reason, r.source, r.recorded_at)
        for r in rows
    ]


def _trim_payload(payload: Any) -> Any:
    # A failed attempt's payload carries the traceback; the demo shows the error line.
    if isinstance(payload, dict) and "traceback" in payload:
        return {k: v for k, v in payload.items() if k != "traceback"}
    return payload


def _evidence(engine: Engine, workflow_id: str, step: str) -> list[Evidence]:
    e = t.evidence
    with read(engine) as conn:
        rows = conn.execute(
            select(e.c.kind, e.c.classification, e.c.source, e.c.status, e.c.attempt, e.c.reason)
            .where(e.c.workflow_id == workflow_id, e.c.step == step)
            .order_by(e.c.id)
        ).all()
    return [
        Evidence(
            r.kind,
            r.classification,
            # Consumer names carry a host, pid and random suffix; the role is what matters.
            r.source.split(":", 1)[0],
            r.status,
            r.attempt,
            r.reason,
        )
        for r in rows
    ]


def _replay(engine: Engine, workflow_id: str, step: str, stored: Any) -> list[Report]:
    """Report `step`'s outcome again by hand, as a redelivered or confused message would:
    first exactly what the worker reported, then something different."""
    conflicting = {**stored, "invoice_id": "inv_9999"} if isinstance(stored, dict) else "other"
    reports = []
    for payload, note in (
        (stored, "the worker's outcome, reported again (a redelivery)"),
        (conflicting, "a different outcome for the same attempt"),
    ):
        result = Workflow.complete_step(
            engine, workflow_id, step, status="completed", payload=payload
        )
        reports.append(
            Report(
                step=step,
                status=result.status,
                payload=payload,
                classification=result.classification.value,
                released=result.released,
                cancelled=result.cancelled,
                workflow_outcome=result.workflow_outcome,
                reason=result.reason,
                note=note,
            )
        )
    return reports


# -- the engine's log, kept off the screen ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogLine:
    """A warning or error the engine logged while the demo ran."""

    level: str
    event: str
    detail: str

    def __str__(self) -> str:
        return f"{self.event}: {self.detail}" if self.detail else self.event

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "event": self.event, "detail": self.detail}


class _LogCapture(logging.Handler):
    """Keeps the engine's warnings and errors for the report instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = getattr(record, "sf_fields", {})
        detail = ", ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail += f" ({type(exc).__name__}: {exc})"
        # `handle` holds the handler's own lock around `emit`.
        self.lines.append(LogLine(record.levelname.lower(), record.getMessage(), detail.strip()))


@contextmanager
def _captured_logs() -> Iterator[_LogCapture]:
    """Route the `streamflow` logger to a capture for the duration, then restore it: the
    demo draws a live view on the terminal and must not interleave log lines with it."""
    logger = logging.getLogger("streamflow")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    capture = _LogCapture()
    logger.handlers[:] = [capture]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield capture
    finally:
        logger.handlers[:], logger.propagate, level = saved
        logger.setLevel(level)


def _last_error(log: _LogCapture) -> str:
    errors = [line for line in log.lines if line.level in ("error", "critical")]
    return f": {errors[-1]}" if errors else ""
