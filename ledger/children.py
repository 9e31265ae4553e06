"""A finished step's children, each with every one of its dependencies: what deciding
their fate (`ledger.rules.decide_child`) needs, in one statement."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    ScalarSelect,
    bindparam,
    exists,
    func,
    literal_column,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by

from ledger import tables as t
from ledger.rules import (
    AwaitState,
    ChildDecision,
    DependencyView,
    EdgePolicy,
    StepState,
    decide_child,
)


@dataclass
class Child:
    name: str
    state: StepState
    queue: str
    priority: int
    #: Every dependency, with the root cause to record if that dependency cancels it.
    deps: list[tuple[DependencyView, str]] = field(default_factory=list)
    #: Its await, if it waits for a signal too: state, accepted signal, deadline length.
    await_state: AwaitState | None = None
    signal_id: int | None = None
    deadline_ms: int | None = None

    @property
    def awaiting_signal(self) -> bool:
        """It has an await and no signal was accepted for it yet."""
        return self.await_state is not None and self.signal_id is None

    def decide(self) -> ChildDecision:
        return decide_child([d for d, _ in self.deps], awaiting_signal=self.awaiting_signal)


# The finished step's children (the (workflow_id, parent) index), for both backends.
# SQLite: their edges joined to both ends' steps; its planner takes the IN list of the
# children's names as given (`CHILDREN_WITH_DEPS_SQLITE`, below).
_e, _de = t.edges, t.edges.alias("de")
_p, _c, _aw = t.steps.alias("p"), t.steps.alias("c"), t.awaits
_kids = (
    select(_e.c.child.label("kid"))
    .where(_e.c.workflow_id == bindparam("b_wf"), _e.c.parent == bindparam("b_parent"))
    .subquery("kids")
)


def _dep_columns_of(de: Any, p: Any, c: Any, aw: Any) -> tuple[ColumnElement[Any], ...]:
    """A child's edge with what deciding its fate needs: the edge `de`, its parent's row
    `p`, its own row `c` and its await `aw` (each a table alias or a subquery)."""
    return (
        de.c.child,
        de.c.parent,
        de.c.policy,
        p.c.state.label("parent_state"),
        p.c.terminal_cause,
        p.c.cancel_root_step,
        c.c.state.label("child_state"),
        c.c.queue,
        c.c.priority,
        aw.c.state.label("await_state"),
        aw.c.signal_id,
        aw.c.deadline_ms,
    )


_dep_columns = (
    select(*_dep_columns_of(_de, _p, _c, _aw))
    .join(_p, (_p.c.workflow_id == _de.c.workflow_id) & (_p.c.name == _de.c.parent))
    .join(_c, (_c.c.workflow_id == _de.c.workflow_id) & (_c.c.name == _de.c.child))
    .outerjoin(_aw, (_aw.c.workflow_id == _de.c.workflow_id) & (_aw.c.step == _de.c.child))
    .where(_de.c.workflow_id == bindparam("b_wf"))
)

# PostgreSQL: from the finished step's edges to its children (the (workflow_id, parent)
# index), then for each child its edges, and for each edge its parent's and its child's
# rows and the child's await — each a LATERAL subquery the planner cannot flatten (LIMIT,
# OFFSET), so each is a lookup by primary key, whatever the statistics say. Joined
# plainly, a planner that believes a workflow has a row or two (a table filled since its
# last ANALYZE, or one analyzed while it held small workflows) scanned the workflow's
# every step for each edge: 25 s a hop on a 4,000-step chain. Each lookup is keyed by
# the workflow id parameter itself, so a partitioned ledger prunes to one partition when
# the statement is planned.
_lat_de = (
    select(_de.c.workflow_id, _de.c.child, _de.c.parent, _de.c.policy)
    .where(_de.c.workflow_id == bindparam("b_wf"), _de.c.child == _kids.c.kid)
    .offset(0)
    .lateral("de")
)


def _one_step(alias: str, name: ColumnElement[Any], *columns: str) -> Any:
    s = t.steps
    return (
        select(*(s.c[c] for c in columns))
        .where(s.c.workflow_id == bindparam("b_wf"), s.c.name == name)
        .limit(1)
        .lateral(alias)
    )


_lat_p = _one_step("p", _lat_de.c.parent, "state", "terminal_cause", "cancel_root_step", "position")
_lat_c = _one_step("c", _lat_de.c.child, "state", "queue", "priority", "position")
_lat_aw = (
    select(_aw.c.state, _aw.c.signal_id, _aw.c.deadline_ms)
    .where(_aw.c.workflow_id == bindparam("b_wf"), _aw.c.step == _lat_de.c.child)
    .limit(1)
    .lateral("aw")
)
_PG_DEP_COLUMNS = _dep_columns_of(_lat_de, _lat_p, _lat_c, _lat_aw)
_pg_deps_from = (
    _kids.join(_lat_de, true()).join(_lat_p, true()).join(_lat_c, true()).outerjoin(_lat_aw, true())
)
CHILDREN_WITH_DEPS = (
    select(*_PG_DEP_COLUMNS)
    .select_from(_pg_deps_from)
    .order_by(_lat_c.c.position, _lat_p.c.position)
)
# The same rows as one JSON array, for a statement that reads more than the children
# (`ledger.transitions`: the finished step's row and history come with them).
CHILDREN_JSON = (
    select(
        func.json_agg(
            aggregate_order_by(
                func.json_build_object(
                    *(x for c in _PG_DEP_COLUMNS for x in (literal_column(f"'{c.name}'"), c))
                ),
                _lat_c.c.position,
                _lat_p.c.position,
            )
        )
    )
    .select_from(_pg_deps_from)
    .scalar_subquery()
)


def parent_results_json(
    workflow_id: ColumnElement[Any], child: ColumnElement[Any], *, but: Any = None
) -> ScalarSelect[Any]:
    """PostgreSQL: the stored results of `child`'s parents (`but` one) as one JSON
    object by parent name, a parent without a stored result left out; for a claim's read.

    Correlated lookups by primary key, not a join: with the join the planner could (and
    on a freshly filled table did) walk every result of the workflow for each parent —
    5 ms a claim on a 200-step chain.
    """
    pe, r = t.edges.alias("pe"), t.results
    stored = (r.c.workflow_id == pe.c.workflow_id) & (r.c.step == pe.c.parent)
    where = [pe.c.workflow_id == workflow_id, pe.c.child == child]
    if but is not None:
        where.append(pe.c.parent != but)
    return (
        select(
            func.json_object_agg(pe.c.parent, select(r.c.payload).where(stored).scalar_subquery())
        )
        .where(*where, exists(select(r.c.attempt).where(stored)))
        .scalar_subquery()
    )


# SQLite has no arrays; its planner takes the IN list as given.
CHILDREN_WITH_DEPS_SQLITE = _dep_columns.where(_de.c.child.in_(select(_kids.c.kid))).order_by(
    _c.c.position, _p.c.position
)


def children_with_deps(conn: Connection, workflow_id: str, parent: str) -> list[Child]:
    """Each child of `parent` with all of its dependencies, ordered by position."""
    query = CHILDREN_WITH_DEPS if conn.dialect.name == "postgresql" else CHILDREN_WITH_DEPS_SQLITE
    rows = conn.execute(query, {"b_wf": workflow_id, "b_parent": parent}).mappings()
    return group_children(rows)


def group_children(rows: Iterable[Mapping[Any, Any]]) -> list[Child]:
    """Children from rows of one child and one of its dependencies each, in order."""
    grouped: dict[str, Child] = {}
    for r in rows:
        await_state = r["await_state"]
        child = grouped.setdefault(
            r["child"],
            Child(
                r["child"],
                StepState(r["child_state"]),
                r["queue"],
                r["priority"],
                await_state=None if await_state is None else AwaitState(await_state),
                signal_id=r["signal_id"],
                deadline_ms=r["deadline_ms"],
            ),
        )
        cancelled_by_dependency = r["terminal_cause"] == "cancelled_by_dependency"
        root = r["cancel_root_step"] if cancelled_by_dependency else r["parent"]
        child.deps.append(
            (
                DependencyView(r["parent"], StepState(r["parent_state"]), EdgePolicy(r["policy"])),
                root,
            )
        )
    return list(grouped.values())
