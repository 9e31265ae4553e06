"""The workflows `streamflow demo` builds, inserts and completes against a real ledger.

No engine runs workers yet, so the demo plays the worker's part itself: it records each
step's outcome with `Workflow.complete_step`, with the payload that worker would return.
Everything else is real: validation, the ledger's transactions, releases, cascades,
evidence and `Explain`.

This module returns plain data (`DemoReport`); `streamflow.render` draws it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ledger.db import Repo
from ledger.placeholders import resolve
from streamflow.builder import Dep, Workflow
from streamflow.explain import Explain, StepExplanation
from streamflow.render import StepView, step_views
from streamflow.worker import Worker

NOTE = (
    "No engine runs workers yet: this demo records each step's outcome itself with "
    "Workflow.complete_step, as a worker would."
)


# -- demo workers: they exist to produce job specs --------------------------------------


class FetchCustomer(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"customer_id": args["account_id"], "email": "ada@example.com"}


class SyncBilling(Worker):
    queue = "billing"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"invoice_id": "inv_1001", "customer_id": args["customer"]["customer_id"]}


class Cleanup(Worker):
    max_attempts = 5

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"temp_files_removed": 3}


class LoadOrders(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"orders": 1200}


class SummarizeRegion(Worker):
    queue = "reports"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"region": args["region"], "revenue": 0}


class MergeReports(Worker):
    queue = "reports"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"regions": 3}


class ChargeCard(Worker):
    queue = "payments"
    max_attempts = 1

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        raise RuntimeError("card declined")


class SendReceipt(Worker):
    queue = "emails"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"sent": True}


class ArchiveReceipt(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"archived": True}


class ReleaseHold(Worker):
    queue = "payments"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"hold_released": True}


class IssueInvoice(Worker):
    queue = "billing"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"invoice_id": "inv_2002"}


class EmailInvoice(Worker):
    queue = "emails"

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"sent": True}


class FetchRates(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"EUR": 0.92}


class ConvertPrices(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"converted": 42}


class PublishPrices(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"published": True}


# -- what the demo reports ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """One outcome the demo recorded, and what the ledger made of it."""

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
class Snapshot:
    """Every step of the workflow at one moment."""

    #: The report that led here, or None for the state right after insert.
    after: Report | None
    workflow_state: str
    workflow_outcome: str | None
    needs_review: bool
    steps: tuple[StepView, ...]

    def state_of(self, step: str) -> str:
        return next(s.state for s in self.steps if s.name == step)

    def to_dict(self) -> dict[str, Any]:
        return {
            "after": self.after.to_dict() if self.after else None,
            "workflow_state": self.workflow_state,
            "workflow_outcome": self.workflow_outcome,
            "needs_review": self.needs_review,
            "steps": [s.to_dict() for s in self.steps],
        }


@dataclass(slots=True)
class Scenario:
    key: str
    title: str
    #: What to look at, in one or two sentences.
    summary: str
    workflow_id: str
    workflow_name: str
    #: (parent, child, policy) for every edge, in definition order.
    edges: list[tuple[str, str, str]]
    timeline: list[Snapshot] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    #: Facts the renderer shows: (index of the snapshot they follow, name, value).
    facts: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def final(self) -> Snapshot:
        return self.timeline[-1]

    @property
    def reports(self) -> list[Report]:
        return [s.after for s in self.timeline if s.after is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "summary": self.summary,
            "workflow_id": self.workflow_id,
            "workflow_name": self.workflow_name,
            "edges": [{"parent": p, "child": c, "policy": pol} for p, c, pol in self.edges],
            "timeline": [s.to_dict() for s in self.timeline],
            "final_state": self.final.workflow_state,
            "outcome": self.final.workflow_outcome,
            "results": self.results,
            "facts": {name: value for _, name, value in self.facts},
        }


@dataclass(slots=True)
class DemoReport:
    note: str
    scenarios: list[Scenario]
    #: The step the demo explains, and the explanation.
    explained: StepExplanation

    def scenario(self, key: str) -> Scenario:
        return next(s for s in self.scenarios if s.key == key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "note": self.note,
            "scenarios": [s.to_dict() for s in self.scenarios],
            "explain": self.explained.to_dict(),
        }


# -- running it --------------------------------------------------------------------------


class _Run:
    """One demo workflow: insert it, report outcomes, snapshot after each."""

    def __init__(self, repo: Repo, key: str, title: str, summary: str, wf: Workflow) -> None:
        self.repo = repo
        persisted = Workflow.insert(wf, repo)
        self.id = persisted.id
        self.scenario = Scenario(
            key=key,
            title=title,
            summary=summary,
            workflow_id=persisted.id,
            workflow_name=persisted.name,
            edges=[(d.step, s.name, d.policy) for s in wf.steps for d in s.deps],
        )
        self.snapshot(None)

    def report(self, step: str, status: str, payload: Any = None, note: str = "") -> Report:
        result = Workflow.complete_step(self.repo, self.id, step, status=status, payload=payload)
        report = Report(
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
        self.snapshot(report)
        return report

    def snapshot(self, after: Report | None) -> Snapshot:
        record = Workflow.get(self.repo, self.id)
        results = Workflow.results(self.repo, self.id)
        snap = Snapshot(
            after=after,
            workflow_state=record.state,
            workflow_outcome=record.outcome,
            needs_review=record.needs_review,
            steps=tuple(step_views(record, set(results))),
        )
        self.scenario.timeline.append(snap)
        self.scenario.results = results
        return snap

    def fact(self, name: str, value: str) -> None:
        self.scenario.facts.append((len(self.scenario.timeline) - 1, name, value))


def customer_sync(repo: Repo) -> Scenario:
    wf = (
        Workflow.new("sync_customer", {"account_id": 42, "label": "Customer sync"})
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
    run = _Run(
        repo,
        "customer_sync",
        "1. Customer sync, step by step",
        "fetch_customer -> sync_billing (its args hold Workflow.result('fetch_customer')) "
        "-> cleanup (a `continue` edge: it runs however sync_billing ends).",
        wf,
    )
    customer = {"customer_id": 1, "email": "ada@example.com"}
    run.report("fetch_customer", "completed", customer, "the worker fetched the customer")
    args = Workflow.get(repo, run.id).steps["sync_billing"].args
    resolved, _missing = resolve(args, Workflow.results(repo, run.id))
    run.fact("sync_billing args as stored", _compact(args))
    run.fact("sync_billing args as its worker will see them", _compact(resolved))
    run.report(
        "sync_billing", "completed", {"invoice_id": "inv_1001", "synced": True}, "billing synced"
    )
    run.report("cleanup", "completed", {"temp_files_removed": 3}, "cleanup ran")
    return run.scenario


def fan_out_fan_in(repo: Repo) -> Scenario:
    regions = ("eu", "us", "apac")
    wf = Workflow.new("regional_report", {"month": "2026-11"}).add(
        "load_orders", LoadOrders.new({"month": "2026-11"})
    )
    for region in regions:
        wf = wf.add(
            f"summarize_{region}", SummarizeRegion.new({"region": region}), deps=["load_orders"]
        )
    wf = wf.add(
        "merge_reports",
        MergeReports.new({r: Workflow.result(f"summarize_{r}") for r in regions}),
        deps=[f"summarize_{r}" for r in regions],
    )
    run = _Run(
        repo,
        "fan_out",
        "2. Fan-out / fan-in",
        "load_orders releases three summaries at once; merge_reports waits for all three "
        "and is released exactly once, by the last of them.",
        wf,
    )
    run.report("load_orders", "completed", {"orders": 1200}, "releases the three summaries")
    revenue = {"eu": 41000, "us": 57500, "apac": 23250}
    for region in regions:
        run.report(
            f"summarize_{region}",
            "completed",
            {"region": region, "revenue": revenue[region]},
            f"{region} summary done",
        )
    run.report(
        "merge_reports",
        "completed",
        {"revenue": sum(revenue.values())},
        "merged the three summaries",
    )
    return run.scenario


def failure_cascade(repo: Repo) -> Scenario:
    wf = (
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
    run = _Run(
        repo,
        "failure",
        "3. A failure cascades; cleanup still runs",
        "charge_card fails: send_receipt (cancel edge) and its child archive_receipt are "
        "cancelled; release_hold (continue edge) is released and runs.",
        wf,
    )
    run.report("charge_card", "failed", {"error": "card_declined"}, "the card was declined")
    run.report("release_hold", "completed", {"hold_released": True}, "compensation ran")
    record = Workflow.get(repo, run.id)
    for name in ("send_receipt", "archive_receipt"):
        step = record.steps[name]
        run.fact(
            f"{name} cancelled by",
            f"{step.cancelled_by_step} (root cause: {step.cancel_root_step})",
        )
    return run.scenario


def evidence(repo: Repo) -> Scenario:
    wf = (
        Workflow.new("send_invoice", {"invoice": "inv_2002"})
        .add("issue_invoice", IssueInvoice.new({"customer_id": 1}))
        .add(
            "email_invoice",
            EmailInvoice.new({"invoice": Workflow.result("issue_invoice")}),
            deps=["issue_invoice"],
        )
    )
    run = _Run(
        repo,
        "evidence",
        "4. Duplicate and ambiguous completions are kept as evidence",
        "issue_invoice's outcome arrives three times: the first is applied, an identical "
        "redelivery is a duplicate, a conflicting one is ambiguous. The first result stands.",
        wf,
    )
    first = {"invoice_id": "inv_2002"}
    run.report("issue_invoice", "completed", first, "the worker's report")
    run.report("issue_invoice", "completed", first, "the same report, delivered again")
    run.report(
        "issue_invoice",
        "completed",
        {"invoice_id": "inv_9999"},
        "a conflicting report for the same attempt",
    )
    run.report("email_invoice", "completed", {"sent": True}, "the email went out")
    run.fact("stored result of issue_invoice", _compact(run.scenario.results["issue_invoice"]))
    return run.scenario


def waiting_on_retry(repo: Repo) -> Scenario:
    wf = (
        Workflow.new("price_update", {"currency": "EUR"})
        .add("fetch_rates", FetchRates.new({"currency": "EUR"}))
        .add(
            "convert_prices",
            ConvertPrices.new({"rates": Workflow.result("fetch_rates")}),
            deps=["fetch_rates"],
        )
        .add("publish_prices", PublishPrices.new({}), deps=["convert_prices"])
    )
    run = _Run(
        repo,
        "retry",
        "5. A step waiting on a retry",
        "fetch_rates times out and will be retried; its descendants stay pending meanwhile. "
        "The workflow is left running so you can inspect it.",
        wf,
    )
    run.report(
        "fetch_rates",
        "retryable",
        {"error": "rates API timed out"},
        "attempt 1 failed; a retry is scheduled",
    )
    return run.scenario


SCENARIOS = (customer_sync, fan_out_fan_in, failure_cascade, evidence, waiting_on_retry)

#: The step the demo explains at the end: (scenario key, step).
EXPLAINED = ("retry", "convert_prices")


def run_demo(repo: Repo) -> DemoReport:
    """Build, insert and complete every demo workflow on `repo` (a migrated ledger)."""
    scenarios = [build(repo) for build in SCENARIOS]
    key, step = EXPLAINED
    target = next(s for s in scenarios if s.key == key)
    explained = Explain.workflow_step(target.workflow_id, step, repo=repo)
    return DemoReport(note=NOTE, scenarios=scenarios, explained=explained)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), sort_keys=True)
