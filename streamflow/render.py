"""Rich rendering for the CLI: labels first, raw semantics beneath.

The step views here are computed with `ledger.blockers.diagnose`, the same function
`Explain` uses, from one `Workflow.get` and the set of steps with a stored result, so a
whole workflow is labelled with two queries.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
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
    from streamflow.demo import Attempt, DemoReport, DemoWorkflow, Progress, Report

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
    "consumed": "green",
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
            awaiting_signal=step.await_signal if step.awaiting_signal else None,
            await_active=step.await_state == "waiting",
            signal_deadline_at=step.signal_deadline_at,
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


def progress(p: Progress, *, streams: str, queues: Sequence[str]) -> RenderableType:
    """The live view: every step of every demo workflow, as the ledger has it now."""
    head = Text()
    head.append("Running ", style="bold")
    head.append(f"{len(p.workflows)} workflows", style="bold")
    head.append(
        f" through the engine in this process: a worker for queues {_names(queues)}, "
        f"a completion consumer, the dispatcher and the reconciler, on {streams}."
    )
    status = Text()
    status.append(f"{p.elapsed:4.1f} s  ", style="dim")
    done = p.finished == len(p.workflows)
    status.append(
        f"{p.finished} of {len(p.workflows)} workflows finished",
        style="bold green" if done else "bold yellow",
    )

    table = Table(show_edge=False, pad_edge=False, expand=False)
    table.add_column("workflow", no_wrap=True)
    table.add_column("step", style="bold", no_wrap=True)
    table.add_column("label", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("attempts", justify="right", no_wrap=True)
    # The only column that gives way on a narrow terminal: each reason stays on one line.
    table.add_column("why", style="dim")
    for n, w in enumerate(p.workflows):
        if n:
            table.add_section()
        for i, v in enumerate(w.steps):
            who: Text | str = ""
            if i == 0:
                who = Text(w.workflow_name, style="bold")
            elif i == 1:
                who = (
                    Text(w.outcome, style=f"bold {OUTCOME_STYLES.get(w.outcome, '')}")
                    if w.outcome
                    else Text(w.state, style="yellow")
                )
                if w.needs_review:
                    who.append(", review", style="magenta")
            why = Text(
                "" if v.label in ("Done", "Running") else v.reason,
                no_wrap=True,
                overflow="ellipsis",
            )
            table.add_row(
                who,
                v.name,
                label_text(v.label),
                v.state,
                _attempts(v.attempt, v.max_attempts),
                why,
            )
    return Group(head, status, Text(""), table)


def demo(report: DemoReport) -> list[RenderableType]:
    """What the demo found in the ledger once every workflow had finished."""
    wf = report.workflow
    out: list[RenderableType] = [
        Text(""),
        Rule(Text("What the ledger recorded", style="bold")),
        _outcomes(report),
    ]

    sync = wf("customer_sync")
    out += _section(1, sync)
    out += [
        _fact("sync_billing args as stored", compact_json(report.args_stored)),
        _fact("sync_billing args as its worker saw them", compact_json(report.args_resolved)),
        Text(""),
        _results(sync, title="stored results"),
    ]

    fan = wf("fan_out")
    out += _section(2, fan)
    title = Text()
    title.append(fan.final.workflow_name, style="bold")
    title.append(f"  ({fan.workflow_id})", style="dim")
    out += [
        dag_tree(title, fan.final.steps),
        _fact("merge_reports returned", compact_json(fan.results.get("merge_reports"))),
    ]

    failure = wf("failure")
    out += _section(3, failure)
    out += [_attempt_table(report.failed_step, report.failed_attempts, report.started_at), Text("")]
    for key, step, by, root in report.cancelled:
        if key != failure.key:
            continue
        cause = f"{by}" if by == root or root is None else f"{by} (root cause: {root})"
        out.append(_fact(f"{step} cancelled by", cause))
    ran = [s.name for s in failure.final.steps if s.state == "completed"]
    for step in ran:
        out.append(_fact(f"{step} ran anyway and returned", compact_json(failure.results[step])))

    retry = wf("retry")
    out += _section(4, retry)
    out += [
        _attempt_table(report.flaky_step, report.attempts, report.started_at),
        Text(""),
        _fact("publish_prices returned", compact_json(retry.results.get("publish_prices"))),
    ]

    evidence = wf("evidence")
    out += _section(5, evidence)
    note = Text(
        f"By hand, after the engine run: {report.replayed_step}'s outcome is reported again "
        "with Workflow.complete_step, as a redelivered or confused message would.",
        style="italic",
    )
    out += [note, Text(""), _replay_table(report.replay), Text("")]
    out += [_evidence_table(report), Text("")]
    verdict = Text("workflow ")
    verdict.append(evidence.final.workflow_name, style="bold")
    verdict.append(": ")
    verdict.append_text(outcome_text(evidence.final.state, evidence.final.outcome))
    if evidence.final.needs_review:
        verdict.append(f"  ({report.replayed_step} needs review)", style="magenta")
    out.append(verdict)

    e = report.explained
    out += [
        Text(""),
        Rule(Text(f"6. Explain: why is {e.step} {e.state}?", style="bold"), align="left"),
        explanation(e),
        Text(""),
        Rule(Text("The engine's own counts", style="bold"), align="left"),
        _engine(report),
    ]
    return out


def _section(n: int, w: DemoWorkflow) -> list[RenderableType]:
    return [
        Text(""),
        Rule(Text(f"{n}. {w.title}", style="bold"), align="left"),
        Text(w.summary),
        Text(""),
    ]


def _fact(name: str, value: str) -> Text:
    line = Text()
    line.append(f"{name}: ", style="dim")
    line.append(value)
    return line


def _outcomes(report: DemoReport) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("workflow", style="bold", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("id", style="dim", no_wrap=True, min_width=32)
    for w in report.workflows:
        final = w.final
        outcome = (
            Text(final.outcome, style=f"bold {OUTCOME_STYLES.get(final.outcome, '')}")
            if final.outcome
            else Text(final.state, style="yellow")
        )
        if final.needs_review:
            outcome.append(", needs review", style="magenta")
        table.add_row(final.workflow_name, outcome, w.workflow_id)
    return table


def _results(w: DemoWorkflow, *, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step", style="bold")
    table.add_column("stored result")
    for v in w.final.steps:
        if v.name in w.results:
            table.add_row(v.name, compact_json(w.results[v.name]))
    return table


def _attempt_table(step: str, attempts: Sequence[Attempt], started_at: datetime) -> Table:
    table = Table(
        title=f"attempts of {step}, from the ledger",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("#", justify="right")
    table.add_column("status")
    table.add_column("recorded", justify="right")
    table.add_column("payload", overflow="fold")
    for a in attempts:
        status = Text(a.status, style=OUTCOME_STYLES.get(a.status, "yellow"))
        if a.reason:
            status.append(f" ({a.reason})", style="dim")
        at = f"{(a.recorded_at - started_at).total_seconds():.2f} s"
        table.add_row(str(a.attempt), status, at, compact_json(a.payload))
    table.caption = "recorded: seconds after the engine started"
    table.caption_justify = "left"
    return table


def _replay_table(reports: Sequence[Report]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("reported")
    table.add_column("ledger", overflow="fold")
    table.add_column("effect")
    for n, r in enumerate(reports, 1):
        reported = Text()
        reported.append(f"{r.step} {r.status} {compact_json(r.payload)}", style="bold")
        if r.note:
            reported.append(f"\n{r.note}", style="dim")
        ledger = Text(r.classification, style=CLASSIFICATION_STYLES.get(r.classification, ""))
        if r.reason:
            ledger.append(f"\n{r.reason}", style="dim")
        effect = Text()
        if r.classification != "applied":
            effect.append("kept as evidence; nothing changed", style="yellow")
        if r.classification == "ambiguous":
            effect.append(f"\nfirst result stands; {r.step} flagged for review", style="magenta")
        table.add_row(str(n), reported, ledger, effect)
    return table


def _evidence_table(report: DemoReport) -> Table:
    table = Table(
        title=f"evidence rows for {report.replayed_step}",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    for column in ("kind", "classification", "source", "status", "attempt", "reason"):
        table.add_column(column)
    for e in report.evidence:
        table.add_row(
            e.kind,
            Text(e.classification, style=CLASSIFICATION_STYLES.get(e.classification, "")),
            e.source,
            e.status or "-",
            "-" if e.attempt is None else str(e.attempt),
            e.reason or "-",
        )
    return table


def _engine(report: DemoReport) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for name, stats in report.engine.items():
        grid.add_row(name, counters_line(stats))
    grid.add_row(
        "run",
        f"{report.elapsed:.2f} s from start until every workflow had finished; "
        f"the ledger was read {report.polls} times meanwhile",
    )
    parts: list[RenderableType] = [grid]
    if report.log:
        parts.append(Text(f"the engine logged {len(report.log)} warning(s):", style="yellow"))
        parts += [Text(f"  {line}", style="yellow") for line in report.log]
        if any(line.event == "reconciler.streams_reset" for line in report.log):
            parts.append(
                Text(
                    "  (streams_reset: the reconciler found that the streams lost their data "
                    "since its last pass, as an in-process stream does in every new process, "
                    "and dispatched the available steps again; a second ready message for a "
                    "step is refused at claim, so nothing runs twice.)",
                    style="dim",
                )
            )
    return Group(*parts)
