"""Rich rendering for the CLI: labels first, raw semantics beneath.

The step views here are computed with `ledger.blockers.diagnose`, the same function
`Explain` uses, from one `Workflow.get` and the set of steps with a stored result, so a
whole workflow is labelled with two queries.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ledger.blockers import StepFacts, diagnose
from ledger.explain import StepExplanation
from ledger.model import WorkflowRecord
from ledger.placeholders import referenced_steps
from ledger.rules import DependencyView

if TYPE_CHECKING:
    from streamflow.demo import DemoReport, Report, Scenario, Snapshot

#: The colour of each operator label.
LABEL_STYLES: dict[str, str] = {
    "Runnable": "cyan",
    "Running": "blue",
    "Waiting": "yellow",
    "Blocked": "red",
    "Needs Review": "magenta",
    "Done": "green",
    "Cancelled": "bright_black",
}

OUTCOME_STYLES: dict[str, str] = {
    "completed": "green",
    "failed": "red",
    "cancelled": "bright_black",
}

CLASSIFICATION_STYLES: dict[str, str] = {
    "applied": "green",
    "duplicate": "yellow",
    "late": "yellow",
    "ambiguous": "magenta",
}


# -- step views ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepView:
    """One step as the operator sees it: the label and reason, with the raw facts."""

    name: str
    label: str
    state: str
    blocker_codes: tuple[str, ...]
    reason: str
    attempt: int
    max_attempts: int
    #: (parent, policy) for each dependency, in the parents' definition order.
    deps: tuple[tuple[str, str], ...]
    needs_review: bool
    cancelled_by_step: str | None
    cancel_root_step: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "state": self.state,
            "blocker_codes": list(self.blocker_codes),
            "reason": self.reason,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "deps": [{"step": p, "policy": pol} for p, pol in self.deps],
            "needs_review": self.needs_review,
            "cancelled_by_step": self.cancelled_by_step,
            "cancel_root_step": self.cancel_root_step,
        }


def step_views(record: WorkflowRecord, with_results: Collection[str]) -> list[StepView]:
    """Label every step of `record`; `with_results` names the steps with a stored result."""
    position = {name: i for i, name in enumerate(record.steps)}
    views: list[StepView] = []
    for step in record.steps.values():
        deps = sorted(step.deps, key=lambda d: position.get(d[0], len(position)))
        facts = StepFacts(
            state=step.state,
            needs_review=step.needs_review,
            terminal_cause=step.terminal_cause,
            cancelled_by_step=step.cancelled_by_step,
            cancel_root_step=step.cancel_root_step,
            deps=[
                (DependencyView(parent, record.steps[parent].state, policy), parent in with_results)
                for parent, policy in deps
            ],
            referenced=frozenset(referenced_steps(step.args)),
        )
        d = diagnose(facts)
        views.append(
            StepView(
                name=step.name,
                label=d.label.value,
                state=step.state.value,
                blocker_codes=tuple(b.value for b in d.blockers),
                reason=d.reason,
                attempt=step.attempt,
                max_attempts=step.max_attempts,
                deps=tuple((parent, policy.value) for parent, policy in deps),
                needs_review=step.needs_review,
                cancelled_by_step=step.cancelled_by_step,
                cancel_root_step=step.cancel_root_step,
            )
        )
    return views


# -- small pieces ------------------------------------------------------------------------------


def label_text(label: str, *, big: bool = False) -> Text:
    style = LABEL_STYLES.get(label, "white")
    if big:
        return Text(f" {label.upper()} ", style=f"bold reverse {style}")
    return Text(label, style=f"bold {style}")


def outcome_text(state: str, outcome: str | None) -> Text:
    if outcome is None:
        return Text(state, style="yellow")
    return Text(f"{state}, outcome {outcome}", style=f"bold {OUTCOME_STYLES.get(outcome, '')}")


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), sort_keys=True)


def _attempts(attempt: int, max_attempts: int) -> str:
    return f"{attempt}/{max_attempts}"


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "-"


def states_table(views: Sequence[StepView], *, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step", style="bold")
    table.add_column("label")
    table.add_column("state")
    table.add_column("attempts", justify="right")
    table.add_column("why")
    for v in views:
        table.add_row(
            v.name,
            label_text(v.label),
            v.state,
            _attempts(v.attempt, v.max_attempts),
            Text(v.reason, style="dim"),
        )
    return table


def counters_line(counters: dict[str, int]) -> Text:
    text = Text()
    for i, (name, count) in enumerate(counters.items()):
        if i:
            text.append("  ")
        text.append(f"{name} ", style="dim")
        text.append(str(count), style="bold" if count else "dim")
    return text


# -- the DAG as a tree -----------------------------------------------------------------------------


def dag_tree(title: Text | str, views: Sequence[StepView], *, reasons: bool = False) -> Tree:
    """Roots at the top, each child under each of its parents.

    A step with several parents appears under every one of them, marked with all its
    parents; its own children are drawn once, under the first. With `reasons`, steps that
    are not done say why, in the words `streamflow explain` uses.
    """
    by_name = {v.name: v for v in views}
    children: dict[str, list[tuple[str, str]]] = {v.name: [] for v in views}
    for v in views:
        for parent, policy in v.deps:
            children.setdefault(parent, []).append((v.name, policy))
    tree = Tree(title)
    drawn: dict[str, str] = {}

    def node_text(v: StepView, policy: str | None) -> Text:
        text = Text()
        text.append(v.name, style="bold")
        text.append("  ")
        text.append_text(label_text(v.label))
        text.append(f"  {v.state} {_attempts(v.attempt, v.max_attempts)}", style="dim")
        if policy == "continue":
            text.append("  via continue", style="cyan")
        if len(v.deps) > 1:
            text.append(f"  [joins {len(v.deps)}: {_names(p for p, _ in v.deps)}]", style="magenta")
        if v.cancelled_by_step:
            text.append(f"  cancelled by {v.cancelled_by_step}", style="red")
            if v.cancel_root_step and v.cancel_root_step != v.cancelled_by_step:
                text.append(f" (root: {v.cancel_root_step})", style="red")
        if v.needs_review:
            text.append("  needs review", style="magenta")
        if reasons and v.label != "Done" and not v.cancelled_by_step and v.reason != v.state:
            text.append(f"\n{v.reason}", style="dim")
        return text

    def add(node: Tree, name: str, policy: str | None, parent: str | None) -> None:
        v = by_name[name]
        branch = node.add(node_text(v, policy))
        if name in drawn:
            if children.get(name):
                branch.add(Text(f"(its children are shown under {drawn[name]})", style="dim"))
            return
        drawn[name] = parent or "the root"
        for child, child_policy in children.get(name, []):
            add(branch, child, child_policy, name)

    for v in views:
        if not v.deps:
            add(tree, v.name, None, None)
    return tree


# -- explain ---------------------------------------------------------------------------------------


def explanation(e: StepExplanation) -> RenderableType:
    """The label (big, coloured) and the reason first; the raw semantics beneath."""
    head = Text()
    head.append_text(label_text(e.label, big=True))
    head.append("  ")
    head.append(e.step, style="bold")
    head.append(f"  in workflow {e.workflow_name} ({e.workflow_id})", style="dim")
    panel = Panel(
        Group(head, Text(""), Text(e.reason)),
        border_style=LABEL_STYLES.get(e.label, "white"),
        expand=False,
    )

    raw = Table.grid(padding=(0, 2))
    raw.add_column(style="dim")
    raw.add_column()
    raw.add_row("state", Text(e.state, style="bold"))
    raw.add_row("attempt", f"{e.attempt} of {e.max_attempts}")
    raw.add_row("blocker codes", _names(e.blocker_codes))
    raw.add_row("needs review", "yes" if e.needs_review else "no")
    if e.terminal_cause:
        raw.add_row("terminal cause", e.terminal_cause)
    if e.cancelled_by_step:
        cause = f"through the cancel edge from {e.cancelled_by_step}"
        if e.cancel_root_step and e.cancel_root_step != e.cancelled_by_step:
            cause += f"; root cause {e.cancel_root_step}"
        raw.add_row("cancel cause", cause)
    if e.scheduled_at is not None:
        raw.add_row("next attempt at", e.scheduled_at.isoformat(timespec="seconds"))
    raw.add_row("workflow", outcome_text(e.workflow_state, e.workflow_outcome))

    parts: list[RenderableType] = [panel, Text("raw semantics", style="bold underline"), raw]
    if e.dependencies:
        deps = Table(title="dependencies", title_justify="left", show_edge=False, pad_edge=False)
        for column in ("step", "state", "policy", "satisfied", "has result"):
            deps.add_column(column)
        for d in e.dependencies:
            deps.add_row(
                d.step,
                d.state,
                d.policy,
                Text("yes", style="green") if d.satisfied else Text("no", style="yellow"),
                "yes" if d.has_result else "no",
            )
        parts += [Text(""), deps]
    else:
        parts += [Text(""), Text("no dependencies (a root step)", style="dim")]
    return Group(*parts)


# -- status ----------------------------------------------------------------------------------------


def workflow_status(record: WorkflowRecord, views: Sequence[StepView]) -> RenderableType:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column()
    summary.add_row("workflow", Text(f"{record.name} ({record.id})", style="bold"))
    summary.add_row("state", outcome_text(record.state, record.outcome))
    summary.add_row(
        "needs review", Text("yes", style="magenta") if record.needs_review else Text("no")
    )
    summary.add_row("steps", counters_line(record.counters.as_dict()))
    summary.add_row("created", record.created_at.isoformat(timespec="seconds"))
    if record.finished_at is not None:
        summary.add_row("finished", record.finished_at.isoformat(timespec="seconds"))
    title = Text(record.name, style="bold")
    return Group(summary, Text(""), dag_tree(title, views, reasons=True))


def status_dict(record: WorkflowRecord, views: Sequence[StepView]) -> dict[str, Any]:
    children: dict[str, list[str]] = {v.name: [] for v in views}
    for v in views:
        for parent, _ in v.deps:
            children.setdefault(parent, []).append(v.name)
    return {
        "workflow": {
            "id": record.id,
            "name": record.name,
            "state": record.state,
            "outcome": record.outcome,
            "needs_review": record.needs_review,
            "semantics_version": record.semantics_version,
            "context": record.context,
            "counters": record.counters.as_dict(),
            "created_at": record.created_at.isoformat(),
            "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        },
        "steps": [{**v.to_dict(), "children": children.get(v.name, [])} for v in views],
    }


# -- the demo --------------------------------------------------------------------------------------


def demo(report: DemoReport) -> list[RenderableType]:
    """The demo's scenarios, then the explanation of the step it left waiting."""
    out: list[RenderableType] = [
        Rule(Text("Streamflow demo", style="bold")),
        Text(report.note, style="italic"),
    ]
    for scenario in report.scenarios:
        out += [
            Text(""),
            Rule(Text(scenario.title, style="bold"), align="left"),
            Text(scenario.summary),
        ]
        out += _scenario(scenario)
    explained = report.explained
    out += [
        Text(""),
        Rule(
            Text(
                f"{len(report.scenarios) + 1}. Explain: why is {explained.step} not running?",
                style="bold",
            ),
            align="left",
        ),
        explanation(explained),
    ]
    return out


def _facts(s: Scenario, at: int | None) -> list[RenderableType]:
    out: list[RenderableType] = []
    for index, name, value in s.facts:
        if at is None or index == at:
            line = Text()
            line.append(f"{name}: ", style="dim")
            line.append(value)
            out.append(line)
    return out


def _scenario(s: Scenario) -> list[RenderableType]:
    out: list[RenderableType] = []
    if s.key == "customer_sync":
        # Step by step: every step's state after each report.
        for index, snap in enumerate(s.timeline):
            out += [Text(""), _caption(snap), states_table(snap.steps), *_facts(s, index)]
        results = Table(title="results", title_justify="left", show_edge=False, pad_edge=False)
        results.add_column("step", style="bold")
        results.add_column("stored result")
        for step, payload in sorted(s.results.items()):
            results.add_row(step, compact_json(payload))
        out += [Text(""), results]
    else:
        final = Text()
        final.append(s.workflow_name, style="bold")
        final.append(f"  ({s.workflow_id})", style="dim")
        out += [
            Text(""),
            _timeline(s.timeline),
            Text(""),
            dag_tree(final, s.final.steps),
            *_facts(s, None),
        ]
    last = s.final
    verdict = Text("workflow ")
    verdict.append(s.workflow_name, style="bold")
    verdict.append(": ")
    verdict.append_text(outcome_text(last.workflow_state, last.workflow_outcome))
    if last.needs_review:
        verdict.append("  (needs review)", style="magenta")
    out += [Text(""), verdict]
    return out


def _caption(snap: Snapshot) -> Text:
    if snap.after is None:
        return Text("inserted", style="bold")
    return _report_line(snap.after)


def _report_line(r: Report) -> Text:
    text = Text()
    text.append(f"{r.step} reported {r.status}", style="bold")
    text.append(" -> ")
    text.append(r.classification, style=CLASSIFICATION_STYLES.get(r.classification, ""))
    if r.released:
        text.append(f"; released {_names(r.released)}", style="cyan")
    if r.cancelled:
        text.append(f"; cancelled {_names(r.cancelled)}", style="red")
    if r.workflow_outcome:
        text.append(f"; workflow finished: {r.workflow_outcome}")
    return text


def _timeline(timeline: Sequence[Snapshot]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("report")
    table.add_column("ledger", overflow="fold")
    table.add_column("effect")
    n = 0
    for snap in timeline:
        r = snap.after
        if r is None:
            continue
        n += 1
        report = Text()
        report.append(f"{r.step} {r.status}", style="bold")
        if r.note:
            report.append(f"\n{r.note}", style="dim")
        ledger = Text(r.classification, style=CLASSIFICATION_STYLES.get(r.classification, ""))
        if r.reason:
            ledger.append(f"\n{r.reason}", style="dim")
        effect = Text()
        if r.released:
            effect.append(f"released {_names(r.released)}\n", style="cyan")
        if r.cancelled:
            effect.append(f"cancelled {_names(r.cancelled)}\n", style="red")
        if r.classification != "applied":
            effect.append("kept as evidence; nothing changed\n", style="yellow")
        if r.classification == "ambiguous":
            effect.append(f"first result stands; {r.step} flagged for review\n", style="magenta")
        if r.workflow_outcome:
            effect.append(f"workflow finished: {r.workflow_outcome}\n")
        effect.rstrip()
        if not effect.plain:
            effect = Text("-", style="dim")
        table.add_row(str(n), report, ledger, effect)
    return table
