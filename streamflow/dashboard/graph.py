"""A workflow's DAG as an SVG drawing, computed on the server: no JavaScript.

Steps are laid out in columns by depth (the longest path from a root), left to right, and
ordered inside each column to keep edges from crossing (a few barycentre sweeps, the usual
Sugiyama heuristic). Each step is a rounded box in its label's colour, linking to the
step's page; each dependency an arrow from parent to child, dashed for a `continue` edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from streamflow.dashboard.theme import label_colour
from streamflow.render import StepView

NODE_W = 176
NODE_H = 46
GAP_X = 64
GAP_Y = 18
PAD = 12
#: Characters of a step name that fit in a box; the full name is in its tooltip.
NAME_CHARS = 22
#: Past this many steps the drawing would be unreadable; the table below it lists all.
MAX_NODES = 400
#: Barycentre passes (down then up counts as two); more gains little.
SWEEPS = 4


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    label: str
    state: str
    attempts: str
    reason: str
    depth: int
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class Edge:
    parent: str
    child: str
    policy: str


@dataclass(frozen=True, slots=True)
class Layout:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    width: int
    height: int
    #: Steps left out because the workflow has more than MAX_NODES.
    omitted: int = 0


def depths(views: Sequence[StepView]) -> dict[str, int]:
    """Each step's depth: 0 for a root, else one more than its deepest parent."""
    deps = {v.name: [p for p, _ in v.deps] for v in views}
    out: dict[str, int] = {}
    for name in deps:
        # Iterative depth-first walk: a long chain must not hit the recursion limit.
        stack = [name]
        while stack:
            top = stack[-1]
            if top in out:
                stack.pop()
                continue
            missing = [
                p for p in deps.get(top, []) if p in deps and p not in out and p not in stack
            ]
            if missing:
                stack.extend(missing)
                continue
            parents = [out[p] for p in deps.get(top, []) if p in out]
            out[top] = 1 + max(parents) if parents else 0
            stack.pop()
    return out


def layout(views: Sequence[StepView]) -> Layout:
    """Place every step; `views` in the workflow's step order (ties keep that order)."""
    shown = list(views[:MAX_NODES])
    names = {v.name for v in shown}
    depth = depths(shown)
    columns: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for v in shown:
        columns[depth[v.name]].append(v.name)
    parents = {v.name: [p for p, _ in v.deps if p in names] for v in shown}
    children: dict[str, list[str]] = {n: [] for n in names}
    for child, ps in parents.items():
        for p in ps:
            children[p].append(child)

    for sweep in range(SWEEPS):
        downward = sweep % 2 == 0
        order = range(1, len(columns)) if downward else range(len(columns) - 2, -1, -1)
        for i in order:
            index = {n: k for col in columns for k, n in enumerate(col)}
            neighbours = parents if downward else children

            def key(
                n: str, idx: dict[str, int] = index, nb: dict[str, list[str]] = neighbours
            ) -> float:
                around = nb[n]
                return sum(idx[m] for m in around) / len(around) if around else idx[n]

            columns[i] = sorted(columns[i], key=key)

    tallest = max((len(c) for c in columns), default=0)
    by_name = {v.name: v for v in shown}
    nodes: list[Node] = []
    for d, column in enumerate(columns):
        # Short columns are centred against the tallest.
        offset = (tallest - len(column)) * (NODE_H + GAP_Y) // 2
        for k, name in enumerate(column):
            v = by_name[name]
            nodes.append(
                Node(
                    name=name,
                    label=v.label,
                    state=v.state,
                    attempts=f"{v.attempt}/{v.max_attempts}",
                    reason=v.reason,
                    depth=d,
                    x=PAD + d * (NODE_W + GAP_X),
                    y=PAD + offset + k * (NODE_H + GAP_Y),
                )
            )
    edges = tuple(
        Edge(parent, v.name, policy) for v in shown for parent, policy in v.deps if parent in names
    )
    width = 2 * PAD + len(columns) * NODE_W + max(len(columns) - 1, 0) * GAP_X
    height = 2 * PAD + tallest * NODE_H + max(tallest - 1, 0) * GAP_Y
    return Layout(tuple(nodes), edges, width, height, omitted=len(views) - len(shown))


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def svg(plan: Layout, href: Callable[[str], str]) -> str:
    """The drawing as an inline `<svg>` element; `href(step)` is each box's link."""
    at = {n.name: n for n in plan.nodes}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" role="img" '
        f'aria-label="workflow graph" width="{plan.width}" height="{plan.height}" '
        f'viewBox="0 0 {plan.width} {plan.height}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#64748b"/></marker></defs>',
    ]
    for e in plan.edges:
        a, b = at[e.parent], at[e.child]
        x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
        x2, y2 = b.x, b.y + NODE_H // 2
        bend = max(GAP_X // 2, (x2 - x1) // 3)
        dash = ' stroke-dasharray="5 4"' if e.policy == "continue" else ""
        parts.append(
            f'<path class="edge" data-from="{escape(e.parent)}" data-to="{escape(e.child)}" '
            f'd="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}" fill="none" '
            f'stroke="#64748b" stroke-width="1.5"{dash} marker-end="url(#arrow)">'
            f"<title>{escape(e.parent)} → {escape(e.child)} ({escape(e.policy)})</title></path>"
        )
    for n in plan.nodes:
        name = escape(n.name)
        colour = label_colour(n.label)
        parts.append(
            f'<a class="node" href="{escape(href(n.name))}" data-step="{name}" '
            f'data-label="{escape(n.label)}">'
            f"<title>{name}: {escape(n.label)} ({escape(n.state)}, attempt {n.attempts})"
            f"\n{escape(n.reason)}</title>"
            f'<rect x="{n.x}" y="{n.y}" width="{NODE_W}" height="{NODE_H}" rx="8" '
            f'fill="{colour}"/>'
            f'<text x="{n.x + 10}" y="{n.y + 19}" class="node-name">{escape(_short(n.name))}</text>'
            f'<text x="{n.x + 10}" y="{n.y + 36}" class="node-meta">{escape(n.label)} · '
            f"{escape(n.state)} {n.attempts}</text></a>"
        )
    parts.append("</svg>")
    return "".join(parts)
