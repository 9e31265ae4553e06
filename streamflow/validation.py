"""Validation of a workflow definition. Pure: values in, a list of problems out.

Every problem is reported, not just the first, so a user fixes a definition in one go.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ledger.jsonsafe import json_problems
from streamflow.errors import ValidationIssue

MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class StepShape:
    """What validation needs to know about one step."""

    name: Any
    deps: Sequence[str]
    #: Steps named by `Workflow.result(...)` placeholders in the args.
    references: Sequence[str]
    #: The args with placeholders already encoded as plain JSON.
    encoded_args: Any
    queue: Any
    max_attempts: Any
    priority: Any
    worker: Any
    #: The signal name it awaits (None: none) and its deadline (a timedelta or None).
    await_signal: Any = None
    signal_deadline: Any = None


def validate(
    name: Any,
    context: Any,
    steps: Sequence[StepShape],
    on_finish: StepShape | None = None,
) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []
    if not _good_name(name):
        issues.append(
            ValidationIssue(
                "invalid_name",
                None,
                f"workflow name must be a non-empty string of at most "
                f"{MAX_NAME} characters, got {name!r}",
            )
        )
    if not isinstance(context, dict):
        issues.append(
            ValidationIssue(
                "not_json_safe",
                None,
                f"workflow_context must be a dict, got {type(context).__name__}",
            )
        )
    else:
        for p in json_problems(context, "workflow_context"):
            issues.append(ValidationIssue("not_json_safe", None, p))
    if not steps:
        issues.append(
            ValidationIssue(
                "empty_workflow",
                None,
                "the workflow has no steps; add at least one with .add(name, Worker.new(...))",
            )
        )

    names = [s.name for s in steps]
    seen: set[Any] = set()
    for s in steps:
        if not _good_name(s.name):
            issues.append(
                ValidationIssue(
                    "invalid_name",
                    _as_step(s.name),
                    f"step names must be non-empty strings of at most "
                    f"{MAX_NAME} characters, got {s.name!r}",
                )
            )
            continue
        if s.name in seen:
            issues.append(
                ValidationIssue(
                    "duplicate_step", s.name, f"step {s.name!r} is added more than once"
                )
            )
        seen.add(s.name)

    known = {n for n in names if _good_name(n)}
    for s in steps:
        if not _good_name(s.name):
            continue
        issues.extend(_job_issues(s))
        issues.extend(_dependency_issues(s, known))
        for p in json_problems(s.encoded_args, "args"):
            issues.append(ValidationIssue("not_json_safe", s.name, p))

    issues.extend(_await_issues(steps))
    issues.extend(_cycles(steps, known))
    if on_finish is not None:
        issues.extend(_callback_issues(on_finish))
    return issues


def _await_issues(steps: Sequence[StepShape]) -> Iterable[ValidationIssue]:
    """A signal name is a non-empty string, awaited by one step of the workflow at most;
    a deadline is a positive timedelta, and only for a step that awaits a signal."""
    awaited: dict[str, str] = {}
    for s in steps:
        if not _good_name(s.name):
            continue
        if s.await_signal is not None:
            if not _good_name(s.await_signal):
                yield ValidationIssue(
                    "invalid_await",
                    s.name,
                    f"await_signal must be a non-empty string of at most {MAX_NAME} "
                    f"characters, got {s.await_signal!r}",
                )
            elif s.await_signal in awaited:
                yield ValidationIssue(
                    "duplicate_await",
                    s.name,
                    f"signal {s.await_signal!r} is already awaited by step "
                    f"{awaited[s.await_signal]!r}; one step per signal name",
                )
            else:
                awaited[s.await_signal] = s.name
        if s.signal_deadline is not None:
            if s.await_signal is None:
                yield ValidationIssue(
                    "invalid_await",
                    s.name,
                    "signal_deadline needs await_signal: a deadline is for a signal",
                )
            if not isinstance(s.signal_deadline, timedelta) or (s.signal_deadline <= timedelta(0)):
                yield ValidationIssue(
                    "invalid_await",
                    s.name,
                    f"signal_deadline must be a positive timedelta, got {s.signal_deadline!r}",
                )


def _callback_issues(job: StepShape) -> Iterable[ValidationIssue]:
    """The `on_finish` job: a valid job with plain JSON args and no result placeholders
    (it has no dependencies; its ctx.results holds every completed step's result)."""
    for issue in _job_issues(job):
        yield ValidationIssue(issue.code, None, f"on_finish: {issue.message}")
    for p in json_problems(job.encoded_args, "on_finish args"):
        yield ValidationIssue("not_json_safe", None, p)
    for ref in dict.fromkeys(job.references):
        yield ValidationIssue(
            "invalid_job",
            None,
            f"on_finish: uses Workflow.result({ref!r}); a callback has no dependencies, so "
            "read the results from ctx.results instead",
        )


def _good_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.strip() == name


def _as_step(name: Any) -> str | None:
    return name if isinstance(name, str) else repr(name)


def _job_issues(s: StepShape) -> Iterable[ValidationIssue]:
    if not isinstance(s.worker, str) or ":" not in s.worker:
        yield ValidationIssue(
            "invalid_job", s.name, f"worker must be an import path 'module:Class', got {s.worker!r}"
        )
    if not isinstance(s.queue, str) or not s.queue or len(s.queue) > 100:
        yield ValidationIssue(
            "invalid_job",
            s.name,
            f"queue must be a non-empty string of at most 100 characters, got {s.queue!r}",
        )
    if (
        isinstance(s.max_attempts, bool)
        or not isinstance(s.max_attempts, int)
        or (s.max_attempts < 1)
    ):
        yield ValidationIssue(
            "invalid_job", s.name, f"max_attempts must be an integer >= 1, got {s.max_attempts!r}"
        )
    if isinstance(s.priority, bool) or not isinstance(s.priority, int):
        yield ValidationIssue(
            "invalid_job", s.name, f"priority must be an integer, got {s.priority!r}"
        )


def _dependency_issues(s: StepShape, known: set[str]) -> Iterable[ValidationIssue]:
    listed: set[str] = set()
    for dep in s.deps:
        if dep == s.name:
            yield ValidationIssue("self_loop", s.name, f"step {s.name!r} depends on itself")
        elif dep not in known:
            yield ValidationIssue(
                "missing_dependency",
                s.name,
                f"depends on {dep!r}, which is not a step of this workflow",
            )
        if dep in listed:
            yield ValidationIssue(
                "duplicate_dependency", s.name, f"lists dependency {dep!r} more than once"
            )
        listed.add(dep)
    for ref in dict.fromkeys(s.references):
        if ref not in listed:
            yield ValidationIssue(
                "missing_dependency",
                s.name,
                f"uses Workflow.result({ref!r}) but {ref!r} is not one of its deps; "
                f"add deps=[{ref!r}, ...] so the result exists before the step runs",
            )


def _cycles(steps: Sequence[StepShape], known: set[str]) -> list[ValidationIssue]:
    """One `cycle` issue per strongly connected component of more than one step."""
    graph: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    for i, s in enumerate(steps):
        if isinstance(s.name, str) and s.name in known and s.name not in graph:
            graph[s.name] = []
            order[s.name] = i
    for s in steps:
        if s.name in graph:
            graph[s.name].extend(d for d in s.deps if d in graph and d != s.name)
    issues = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            members = sorted(component, key=order.__getitem__)
            issues.append(
                ValidationIssue(
                    "cycle",
                    members[0],
                    "dependency cycle through " + " -> ".join(repr(m) for m in members),
                )
            )
    return issues


def _strongly_connected(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so a long chain cannot exhaust the Python stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            edges = graph[node]
            while i < len(edges):
                nxt = edges[i]
                i += 1
                if nxt not in index:
                    work.append((node, i))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                out.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out
