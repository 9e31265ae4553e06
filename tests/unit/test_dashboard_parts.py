"""The dashboard's pure parts: the DAG layout and SVG, and the token and origin rules."""

from __future__ import annotations

import re

import pytest
from starlette.datastructures import Headers

from streamflow.dashboard import graph
from streamflow.dashboard.security import (
    cross_origin,
    host_name,
    is_loopback,
    supplied_token,
    token_ok,
    token_policy,
)
from streamflow.dashboard.theme import LABEL_COLOURS, LABELS, css_class
from streamflow.render import StepView


def view(
    name: str, *deps: str, label: str = "Waiting", continue_: tuple[str, ...] = ()
) -> StepView:
    return StepView(
        name=name,
        label=label,
        state="pending",
        blocker_codes=(),
        reason=f"why {name}",
        attempt=0,
        max_attempts=3,
        deps=tuple((d, "continue" if d in continue_ else "cancel") for d in deps),
        needs_review=False,
        cancelled_by_step=None,
        cancel_root_step=None,
    )


def diamond() -> list[StepView]:
    return [
        view("root", label="Done"),
        view("left", "root", label="Running"),
        view("right", "root", label="Needs Review"),
        view("join", "left", "right", label="Blocked"),
        view("tail", "join", "root", label="Cancelled", continue_=("root",)),
    ]


# -- layout --------------------------------------------------------------------------------------


def test_depth_is_the_longest_path_from_a_root() -> None:
    assert graph.depths(diamond()) == {"root": 0, "left": 1, "right": 1, "join": 2, "tail": 3}
    # Parents listed after their children still count.
    assert graph.depths([view("b", "a"), view("a")]) == {"a": 0, "b": 1}


def test_a_long_chain_does_not_recurse() -> None:
    chain = [view("s0")] + [view(f"s{i}", f"s{i - 1}") for i in range(1, 3000)]
    assert graph.depths(chain)["s2999"] == 2999


def test_layout_puts_columns_by_depth_without_overlap() -> None:
    plan = graph.layout(diamond())
    at = {n.name: n for n in plan.nodes}
    assert at["root"].x < at["left"].x == at["right"].x < at["join"].x < at["tail"].x
    boxes = [(n.x, n.y) for n in plan.nodes]
    assert len(set(boxes)) == len(boxes)
    for n in plan.nodes:
        assert n.x >= 0 and n.x + graph.NODE_W <= plan.width
        assert n.y >= 0 and n.y + graph.NODE_H <= plan.height
    assert {(e.parent, e.child, e.policy) for e in plan.edges} == {
        ("root", "left", "cancel"),
        ("root", "right", "cancel"),
        ("left", "join", "cancel"),
        ("right", "join", "cancel"),
        ("join", "tail", "cancel"),
        ("root", "tail", "continue"),
    }


def test_ordering_inside_a_column_follows_the_parents() -> None:
    # b2's parent is a2 (second in column 0), b1's is a1: the sweep keeps edges uncrossed.
    views = [view("a1"), view("a2"), view("b2", "a2"), view("b1", "a1")]
    at = {n.name: n for n in graph.layout(views).nodes}
    assert at["b1"].y < at["b2"].y


def test_a_huge_workflow_is_drawn_in_part() -> None:
    views = [view(f"s{i}") for i in range(graph.MAX_NODES + 5)]
    plan = graph.layout(views)
    assert len(plan.nodes) == graph.MAX_NODES and plan.omitted == 5


def test_svg_colours_each_step_by_label_and_escapes_names() -> None:
    views = [*diamond(), view("<x&y>", "root", label="Runnable")]
    drawing = graph.svg(graph.layout(views), lambda step: f"/s/{step}")
    fills = dict(re.findall(r'data-label="([^"]+)">.*?fill="(#[0-9a-f]+)"', drawing, re.S))
    assert fills == {label: LABEL_COLOURS[label] for label in fills}
    assert set(fills) == {"Done", "Running", "Needs Review", "Blocked", "Cancelled", "Runnable"}
    assert drawing.count('class="edge"') == 7
    assert drawing.count('stroke-dasharray="5 4"') == 1
    assert "<x&y>" not in drawing and 'data-step="&lt;x&amp;y&gt;"' in drawing
    assert 'href="/s/&lt;x&amp;y&gt;"' in drawing


def test_long_names_are_shortened_in_the_box_and_whole_in_the_tooltip() -> None:
    name = "a_step_with_a_really_long_descriptive_name"
    drawing = graph.svg(graph.layout([view(name)]), lambda step: "#")
    assert f"<title>{name}: Waiting" in drawing
    assert ">a_step_with_a_really_…</text>" in drawing


def test_every_label_has_a_colour_in_operator_order() -> None:
    assert LABELS[:4] == ("Needs Review", "Blocked", "Waiting", "Runnable")
    assert set(LABELS) == set(LABEL_COLOURS)
    assert css_class("bold red") == "bad" and css_class("") == ""


# -- the token rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("dashboard.internal", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_token_policy() -> None:
    assert token_policy("127.0.0.1", None).token is None
    assert token_policy("127.0.0.1", "  ").token is None
    given = token_policy("127.0.0.1", " mine ")
    assert (given.token, given.generated) == ("mine", False)
    assert token_policy("0.0.0.0", "mine").token == "mine"
    made = token_policy("0.0.0.0", None)
    assert made.generated and made.token is not None and len(made.token) >= 32
    assert token_policy("0.0.0.0", None).token != made.token


def test_token_comparison() -> None:
    assert token_ok(None, "")
    assert token_ok("abc", "abc")
    assert not token_ok("abc", "")
    assert not token_ok("abc", "abcd")
    assert token_ok("tøken", "tøken")  # non-ASCII compares as bytes
    form_first = supplied_token({"token": "f"}, Headers({"x-streamflow-token": "h"}))
    assert form_first == "f"
    assert supplied_token({}, Headers({"authorization": "Bearer b"})) == "b"
    assert supplied_token({}, Headers({"authorization": "Basic b"})) == ""


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("LocalHost:80", "localhost"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("example.com", "example.com"),
        ("", ""),
    ],
)
def test_host_names(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"host": "127.0.0.1:8080"}, False),
        ({"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080"}, False),
        ({"host": "127.0.0.1:8080", "origin": "http://evil.example"}, True),
        ({"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:9999"}, True),
        ({"host": "127.0.0.1:8080", "origin": "null"}, True),
        ({"host": "127.0.0.1:8080", "sec-fetch-site": "cross-site"}, True),
    ],
)
def test_cross_origin_posts(headers: dict[str, str], refused: bool) -> None:
    assert cross_origin(Headers(headers), "http") is refused
