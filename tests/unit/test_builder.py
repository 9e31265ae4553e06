"""The Workflow builder: immutability, job specs, and validation at insert."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger import tables as t
from streamflow import (
    Dep,
    JobSpec,
    ValidationIssue,
    Worker,
    Workflow,
    WorkflowValidationError,
)
from tests.workers import Emails, Noop


def codes(wf: Workflow) -> list[tuple[str, str | None]]:
    return [(i.code, i.step) for i in wf.validate()]


# -- Worker.new -----------------------------------------------------------------------------


def test_worker_new_uses_class_defaults() -> None:
    job = Emails.new({"to": "a@example.com"})
    assert job == JobSpec("tests.workers:Emails", {"to": "a@example.com"}, "emails", 5, 3)


def test_worker_new_overrides() -> None:
    job = Noop.new({}, queue="fast", max_attempts=1, priority=-2)
    assert (job.queue, job.max_attempts, job.priority) == ("fast", 1, -2)


def test_worker_new_copies_args() -> None:
    args: dict[str, Any] = {"items": [1]}
    job = Noop.new(args)
    args["items"].append(2)
    assert job.args == {"items": [1]}


@pytest.mark.parametrize(
    "bad", [{"queue": ""}, {"max_attempts": 0}, {"max_attempts": True}, {"priority": "high"}]
)
def test_worker_new_rejects_bad_options(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Noop.new({}, **bad)


def test_worker_new_rejects_unknown_options() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Noop.new({}, retries=3)


def test_worker_perform_must_be_implemented() -> None:
    with pytest.raises(NotImplementedError):
        Worker().perform({}, None)


# -- the builder ------------------------------------------------------------------------------


def test_add_returns_a_new_workflow_and_leaves_the_original_alone() -> None:
    base = Workflow.new("w")
    one = base.add("a", Noop.new())
    two = one.add("b", Noop.new(), deps=["a"])
    assert base.steps == ()
    assert [s.name for s in one.steps] == ["a"]
    assert [s.name for s in two.steps] == ["a", "b"]
    with pytest.raises(AttributeError):
        two.name = "other"  # type: ignore[misc]


def test_deps_accept_names_deps_and_a_single_name() -> None:
    wf = (
        Workflow.new("w")
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("c", Noop.new(), deps=["a", Dep("b", policy="continue")])
        .add("d", Noop.new(), deps="c")
    )
    assert wf.steps[2].deps == (Dep("a"), Dep("b", "continue"))
    assert wf.steps[3].deps == (Dep("c"),)
    assert wf.validate() == []


def test_dep_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown edge policy"):
        Dep("a", policy="ignore")


def test_add_rejects_a_job_that_is_not_a_job_spec() -> None:
    with pytest.raises(TypeError, match="Worker"):
        Workflow.new("w").add("a", {"worker": "x"})  # type: ignore[arg-type]


def test_context_is_copied() -> None:
    ctx: dict[str, Any] = {"k": [1]}
    wf = Workflow.new("w", workflow_context=ctx)
    ctx["k"].append(2)
    assert wf.workflow_context == {"k": [1]}


# -- validation -------------------------------------------------------------------------------


def test_duplicate_step() -> None:
    wf = Workflow.new("w").add("a", Noop.new()).add("a", Noop.new())
    assert codes(wf) == [("duplicate_step", "a")]


def test_missing_dependency() -> None:
    wf = Workflow.new("w").add("a", Noop.new(), deps=["ghost"])
    assert codes(wf) == [("missing_dependency", "a")]


def test_self_loop() -> None:
    wf = Workflow.new("w").add("a", Noop.new(), deps=["a"])
    assert codes(wf) == [("self_loop", "a")]


def test_cycle_is_reported_once_per_cycle() -> None:
    wf = (
        Workflow.new("w")
        .add("a", Noop.new(), deps=["c"])
        .add("b", Noop.new(), deps=["a"])
        .add("c", Noop.new(), deps=["b"])
        .add("x", Noop.new(), deps=["y"])
        .add("y", Noop.new(), deps=["x"])
        .add("free", Noop.new())
    )
    issues = wf.validate()
    assert [(i.code, i.step) for i in issues] == [("cycle", "a"), ("cycle", "x")]
    assert "'a' -> 'b' -> 'c'" in issues[0].message


def test_long_chain_validates_without_recursion() -> None:
    wf = Workflow.new("w").add("s0", Noop.new())
    for i in range(1, 3000):
        wf = wf.add(f"s{i}", Noop.new(), deps=[f"s{i - 1}"])
    assert wf.validate() == []


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        b"bytes",
        dt.datetime(2026, 1, 1),
        math.nan,
        math.inf,
        -math.inf,
        {1: "int key"},
        object(),
        (1, 2),
        Decimal("1.5"),
    ],
)
def test_not_json_safe_args(value: Any) -> None:
    wf = Workflow.new("w").add("a", Noop.new({"v": value}))
    assert codes(wf) == [("not_json_safe", "a")]


def test_not_json_safe_context_names_no_step() -> None:
    wf = Workflow.new("w", workflow_context={"when": dt.date(2026, 1, 1)}).add("a", Noop.new())
    issues = wf.validate()
    assert [(i.code, i.step) for i in issues] == [("not_json_safe", None)]
    assert "workflow_context.when" in issues[0].message


def test_nested_problems_name_their_path() -> None:
    wf = Workflow.new("w").add("a", Noop.new({"x": [{"y": {1, 2}}]}))
    assert "args.x[0].y" in wf.validate()[0].message


def test_plain_json_is_fine() -> None:
    args = {"s": "x", "i": 1, "f": 1.5, "b": True, "n": None, "l": [1, {"k": []}], "d": {}}
    assert Workflow.new("w", workflow_context=args).add("a", Noop.new(args)).validate() == []


def test_placeholder_must_name_a_dependency() -> None:
    wf = (
        Workflow.new("w")
        .add("a", Noop.new())
        .add("b", Noop.new())
        .add("c", Noop.new({"r": Workflow.result("a"), "s": [Workflow.result("b")]}), deps=["a"])
    )
    issues = wf.validate()
    assert [(i.code, i.step) for i in issues] == [("missing_dependency", "c")]
    assert "Workflow.result('b')" in issues[0].message


def test_placeholders_inside_args_are_allowed() -> None:
    wf = (
        Workflow.new("w")
        .add("a", Noop.new())
        .add("b", Noop.new({"deep": {"list": [Workflow.result("a")]}}), deps=["a"])
    )
    assert wf.validate() == []
    stored = wf.definition().steps[1].args
    assert stored == {"deep": {"list": [{"$streamflow.result": "a"}]}}


def test_every_problem_is_reported_at_once() -> None:
    wf = (
        Workflow.new("w", workflow_context={"bad": {1}})
        .add("a", Noop.new({"t": (1,)}), deps=["a"])
        .add("a", Noop.new())
        .add("b", Noop.new(), deps=["ghost"])
    )
    assert sorted(codes(wf), key=str) == sorted(
        [
            ("not_json_safe", None),
            ("self_loop", "a"),
            ("not_json_safe", "a"),
            ("duplicate_step", "a"),
            ("missing_dependency", "b"),
        ],
        key=str,
    )


def test_empty_workflow_and_bad_names() -> None:
    assert codes(Workflow.new("w")) == [("empty_workflow", None)]
    assert codes(Workflow.new("").add("a", Noop.new())) == [("invalid_name", None)]
    assert codes(Workflow.new("w").add("", Noop.new())) == [("invalid_name", "")]


def test_duplicate_dependency() -> None:
    wf = Workflow.new("w").add("a", Noop.new()).add("b", Noop.new(), deps=["a", Dep("a")])
    assert codes(wf) == [("duplicate_dependency", "b")]


def test_insert_raises_with_every_error_and_writes_nothing(sqlite_engine: Engine) -> None:
    wf = Workflow.new("w").add("a", Noop.new(), deps=["a"]).add("b", Noop.new({"x": {1}}))
    with pytest.raises(WorkflowValidationError) as info:
        Workflow.insert(wf, sqlite_engine)
    err = info.value
    assert isinstance(err, ValueError)
    assert all(isinstance(e, ValidationIssue) for e in err.errors)
    assert {e.code for e in err.errors} == {"self_loop", "not_json_safe"}
    assert "2 problems" in str(err)
    with sqlite_engine.connect() as conn:
        for table in (t.workflows, t.steps, t.edges):
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 0
