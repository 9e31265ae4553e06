"""What each dashboard page reads from the ledger: the calls the CLI makes, nothing new.

The workflows page is `ledger.operator.list_workflows` (`streamflow workflows`), a
workflow's page `Workflow.get` + `render.step_views` (`streamflow status`), a step's page
`Explain.workflow_step` (`streamflow explain`) and `ledger.operator.evidence_timeline`
(`streamflow evidence`). Plain synchronous functions: the app runs them in a thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from ledger.db import read
from ledger.explain import StepExplanation
from ledger.model import WorkflowRecord
from ledger.operator import (
    MAX_LIMIT,
    WORKFLOW_OUTCOMES,
    WORKFLOW_STATES,
    OperatorError,
    WorkflowSummary,
    evidence_timeline,
    list_workflows,
)
from ledger.reads import workflow_row
from streamflow import render
from streamflow.builder import Workflow
from streamflow.cli import CliError
from streamflow.commands.operator import DEFAULT_TIMELINE_LIMIT, parse_duration
from streamflow.dashboard.theme import LABELS
from streamflow.explain import Explain


class BadInput(ValueError):
    """The request asked for something that cannot be done as asked: HTTP 400, its message
    on the page."""


# -- the workflows page -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filters:
    """The workflows page's query string, as typed (shown back in the form) and parsed."""

    state: str = ""
    outcome: str = ""
    name: str = ""
    older_than: str = ""
    newer_than: str = ""
    limit: str = "50"

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        return cls(
            **{
                key: query.get(key, default).strip()
                for key, default in (
                    ("state", ""),
                    ("outcome", ""),
                    ("name", ""),
                    ("older_than", ""),
                    ("newer_than", ""),
                    ("limit", "50"),
                )
            }
        )

    def arguments(self) -> dict[str, Any]:
        """`list_workflows` keyword arguments; BadInput names the field that is wrong."""
        if self.state and self.state not in WORKFLOW_STATES:
            raise BadInput(f"state must be one of {', '.join(WORKFLOW_STATES)}, got {self.state!r}")
        if self.outcome and self.outcome not in WORKFLOW_OUTCOMES:
            raise BadInput(
                f"outcome must be one of {', '.join(WORKFLOW_OUTCOMES)}, got {self.outcome!r}"
            )
        if not self.limit.isdigit() or not 1 <= int(self.limit) <= MAX_LIMIT:
            raise BadInput(
                f"limit must be a whole number from 1 to {MAX_LIMIT}, got {self.limit!r}"
            )
        return {
            "state": self.state or None,
            "outcome": self.outcome or None,
            "name": self.name or None,
            "older_than": _duration(self.older_than, "older than"),
            "newer_than": _duration(self.newer_than, "newer than"),
            "limit": int(self.limit),
        }


def _duration(text: str, what: str) -> timedelta | None:
    if not text:
        return None
    try:
        return parse_duration(text, what)
    except CliError as exc:
        raise BadInput(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Group:
    """The workflows whose most urgent step carries `label`."""

    label: str
    workflows: list[WorkflowSummary] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Overview:
    workflows: list[WorkflowSummary]
    #: One group per label, in `LABELS` order (Needs Review, Blocked, Waiting, Runnable
    #: first); each workflow sits in the group of its most urgent label.
    groups: list[Group]
    #: label -> (workflows with at least one such step, steps with it), for every label.
    totals: dict[str, tuple[int, int]]
    limit: int


def overview(engine: Engine, filters: Filters, now: datetime) -> Overview:
    arguments = filters.arguments()
    try:
        with read(engine) as conn:
            rows = list_workflows(conn, now=now, **arguments)
    except OperatorError as exc:
        raise BadInput(str(exc)) from None
    groups = {label: Group(label) for label in LABELS}
    for w in rows:
        first = next((label for label in LABELS if w.labels.get(label)), LABELS[-1])
        groups[first].workflows.append(w)
    totals = {
        label: (
            sum(1 for w in rows if w.labels.get(label)),
            sum(w.labels.get(label, 0) for w in rows),
        )
        for label in LABELS
    }
    return Overview(rows, list(groups.values()), totals, arguments["limit"])


# -- one workflow ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowPage:
    record: WorkflowRecord
    views: list[render.StepView]
    #: label -> how many steps carry it, in `LABELS` order, zero counts included.
    label_counts: dict[str, int]
    #: step -> the steps that depend on it.
    children: dict[str, list[str]]


def workflow_page(engine: Engine, workflow_id: str) -> WorkflowPage:
    """What `streamflow status` shows. Unknown id: WorkflowNotFoundError."""
    record = Workflow.get(engine, workflow_id)
    with_results = set(Workflow.results(engine, workflow_id))
    views = render.step_views(record, with_results)
    counts = {label: 0 for label in LABELS}
    children: dict[str, list[str]] = {v.name: [] for v in views}
    for v in views:
        counts[v.label] = counts.get(v.label, 0) + 1
        for parent, _ in v.deps:
            children.setdefault(parent, []).append(v.name)
    return WorkflowPage(record, views, counts, children)


# -- one step ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepPage:
    explanation: StepExplanation
    #: `evidence_timeline` entries, oldest first: the latest DEFAULT_TIMELINE_LIMIT.
    timeline: list[dict[str, Any]]
    truncated: bool
    created_at: datetime


def step_page(engine: Engine, workflow_id: str, step: str) -> StepPage:
    """What `streamflow explain` and `streamflow evidence` show. Unknown workflow or step:
    WorkflowNotFoundError / StepNotFoundError."""
    explanation = Explain.workflow_step(workflow_id, step, repo=engine)
    with read(engine) as conn:
        created: datetime = workflow_row(conn, workflow_id)["created_at"]
        entries = evidence_timeline(conn, workflow_id, limit=DEFAULT_TIMELINE_LIMIT + 1)
    truncated = len(entries) > DEFAULT_TIMELINE_LIMIT
    return StepPage(explanation, entries[-DEFAULT_TIMELINE_LIMIT:], truncated, created)
