"""Operator commands: `workflows`, `evidence`, `retry` and `replay`.

Reads lead with the control-plane labels; writes go through `ledger.operator`, which
records each action as `operator` evidence. Bad input — an unknown workflow or step, a
malformed duration, a state that does not exist, a step that cannot be retried — ends in
one red line and exit code 2; trouble with the database or Redis in exit code 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ledger.db import read, transaction
from ledger.errors import StepNotFoundError, WorkflowNotFoundError
from ledger.operator import (
    MAX_LIMIT,
    WORKFLOW_OUTCOMES,
    WORKFLOW_STATES,
    OperatorError,
    WorkflowSummary,
    evidence_timeline,
    list_workflows,
    record_replay,
    retry_step,
)
from ledger.reads import workflow_row
from ledger.rules import CompletionStatus
from streamflow import render
from streamflow.cli import (
    EXIT_ERROR,
    EXIT_USAGE,
    CliError,
    DatabaseUrlOption,
    JsonOption,
    RedisUrlOption,
    _choose,
    _connect_streams,
    _edge,
    _keys,
    _open,
    _print_json,
    _redis_url,
    _stdout,
    app,
)
from streamflow.streams.codec import CompletionEvent
from streamflow.streams.publisher import Publisher

WorkflowIdArgument = Annotated[
    str, typer.Argument(help="The workflow's id.", metavar="WORKFLOW_ID", show_default=False)
]
StepArgument = Annotated[
    str, typer.Argument(help="The step's name.", metavar="STEP", show_default=False)
]

#: Colours for classifications the shared table does not cover.
STYLES: dict[str, str] = {
    **render.CLASSIFICATION_STYLES,
    "dropped": "red",
    "unmatched": "red",
    "recorded": "cyan",
    "replayed": "cyan",
    "retried": "cyan",
    "requested": "red",
    "inserted": "dim",
    "finished": "bold",
}

#: How many timeline entries `evidence` shows unless told otherwise.
DEFAULT_TIMELINE_LIMIT = 500


@contextmanager
def _bad_input() -> Iterator[None]:
    """Ids that name nothing and requests the ledger refuses are the caller's mistake:
    one line, exit code 2."""
    try:
        yield
    except (WorkflowNotFoundError, StepNotFoundError, OperatorError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


# -- parsing --------------------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str, option: str) -> timedelta:
    """`30s`, `10m`, `1h`, `2d`, `1w`, or combined like `1h30m`; a positive length of time."""
    raw = text.strip().lower().replace(" ", "")
    seconds = 0.0
    at = 0
    for match in _PART.finditer(raw):
        if match.start() != at:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        at = match.end()
    if not raw or at != len(raw):
        raise CliError(
            f"{option} must be a duration like 30s, 10m, 1h, 2d or 1h30m, got {text!r}", EXIT_USAGE
        )
    if seconds <= 0:
        raise CliError(f"{option} must be longer than zero, got {text!r}", EXIT_USAGE)
    return timedelta(seconds=seconds)


def _whole(text: str, option: str, *, maximum: int | None = None) -> int:
    raw = text.strip()
    if not re.fullmatch(r"[1-9][0-9]*", raw) or (maximum is not None and int(raw) > maximum):
        wanted = f"from 1 to {maximum}" if maximum is not None else "of 1 or more"
        raise CliError(f"{option} must be a whole number {wanted}, got {text!r}", EXIT_USAGE)
    return int(raw)


def _choice(value: str | None, option: str, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    clean = value.strip().lower()
    if clean not in allowed:
        raise CliError(f"{option} must be one of {', '.join(allowed)}, got {value!r}", EXIT_USAGE)
    return clean


# -- small renderings -----------------------------------------------------------------------------


def age_text(delta: timedelta) -> str:
    """A short, rounded length of time: 45s, 12m, 3h 05m, 4d 02h."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _offset(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"+{seconds:.3f}s"
    return "+" + age_text(delta)


def labels_text(labels: dict[str, int]) -> Columns:
    """`2 Needs Review · 1 Blocked · 3 Waiting`, each label in its colour, most urgent
    first. A narrow table stacks them, breaking between labels, never inside one."""
    parts = []
    for i, (label, count) in enumerate(labels.items()):
        part = Text(no_wrap=True, overflow="ellipsis")
        if i:
            part.append("· ", style="dim")
        part.append(f"{count} {label}", style=f"bold {render.LABEL_STYLES.get(label, '')}")
        parts.append(part)
    return Columns(parts, padding=(0, 1))


def _done_text(counters: dict[str, int]) -> str:
    """Completed steps of all: the control-plane column says what the others are doing."""
    return f"{counters['completed']}/{sum(counters.values())}"


def _state_text(state: str, outcome: str | None) -> Text:
    if outcome is None:
        return Text(state, style="yellow")
    return Text(f"{state} · {outcome}", style=f"bold {render.OUTCOME_STYLES.get(outcome, '')}")


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _entry_detail(entry: dict[str, Any]) -> str:
    detail = entry["detail"]
    if entry["kind"] == "workflow":
        if entry["classification"] == "inserted":
            return f"{detail['name']}, {detail['steps']} steps"
        return f"outcome {detail['outcome']}"
    if entry["kind"] == "operator" and isinstance(detail.get("payload") or {}, dict):
        return _operator_detail(entry["classification"], entry["status"], detail)
    if entry["kind"] == "callback" and entry["classification"] == "enqueued":
        return f"{detail.get('worker')} on queue {detail.get('queue')}"
    parts: list[str] = []
    if entry["kind"] == "signal" and detail.get("name"):
        parts.append(f"signal {detail['name']}")
    if entry["status"] and entry["kind"] not in ("attempt", "callback"):
        parts.append(f"status {entry['status']}")
    elif entry["status"]:
        parts.append(entry["status"])
    if entry["reason"]:
        parts.append(
            _clip(repr(entry["reason"]))
            if entry["kind"] == "cancel_request"
            else str(entry["reason"])
        )
    if entry["kind"] == "cancel_request" and detail.get("effect"):
        parts.append(f"{detail['effect']}, {detail.get('cancelled_steps', 0)} steps cancelled")
    if detail.get("payload") is not None:
        parts.append(_clip(render.compact_json(detail["payload"])))
    if entry["kind"] == "recovery" and detail.get("pass_id") is not None:
        parts.append(f"pass {detail['pass_id']}")
    return " · ".join(parts) or "-"


def _operator_detail(classification: str, status: str | None, detail: dict[str, Any]) -> str:
    payload: dict[str, Any] = detail.get("payload") or {}
    parts: list[str] = []
    if payload.get("reason"):
        parts.append(_clip(repr(str(payload["reason"]))))
    if classification == "retried":
        budget = payload.get("max_attempts") or {}
        if budget.get("before") != budget.get("after"):
            parts.append(f"max attempts {budget.get('before')} -> {budget.get('after')}")
        if payload.get("restored"):
            parts.append("restored " + ", ".join(payload["restored"]))
        if payload.get("recancelled"):
            parts.append("cancelled again " + ", ".join(payload["recancelled"]))
        if payload.get("workflow_reopened"):
            was = payload.get("previous_outcome")
            parts.append(f"workflow reopened (was {was})" if was else "workflow reopened")
    elif status:
        parts.append(f"status {status}")
    return " · ".join(parts) or "-"


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _jsonable(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "when": entry["when"].isoformat()}


# -- workflows ------------------------------------------------------------------------------------


@app.command("workflows")
def workflows_command(
    state: Annotated[
        str | None,
        typer.Option("--state", help="running or finished.", show_default=False),
    ] = None,
    outcome: Annotated[
        str | None,
        typer.Option(
            "--outcome",
            help="completed, failed or cancelled (finished workflows only).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Only workflows with this name.")
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Created longer ago than this, e.g. 1h, 2d, 1h30m."),
    ] = None,
    newer_than: Annotated[
        str | None,
        typer.Option("--newer-than", help="Created within this, e.g. 10m, 24h."),
    ] = None,
    limit: Annotated[
        str, typer.Option("--limit", help=f"At most this many (1 to {MAX_LIMIT}).", metavar="N")
    ] = "50",
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List workflows, newest first, with what their steps need at a glance.

    Each row has the workflow's state and outcome, how many of its steps carry each
    control-plane label (Needs Review, Blocked and Waiting first), its step counters and
    its age. Filters combine; every query is served by an index.

    **Example:** `streamflow workflows --state running --newer-than 1h`
    """
    with _edge():
        wanted_state = _choice(state, "--state", WORKFLOW_STATES)
        wanted_outcome = _choice(outcome, "--outcome", WORKFLOW_OUTCOMES)
        older = parse_duration(older_than, "--older-than") if older_than is not None else None
        newer = parse_duration(newer_than, "--newer-than") if newer_than is not None else None
        count = _whole(limit, "--limit", maximum=MAX_LIMIT)
    now = datetime.now(UTC)
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            with _bad_input(), read(engine) as conn:
                rows = list_workflows(
                    conn,
                    state=wanted_state,
                    outcome=wanted_outcome,
                    name=name,
                    older_than=older,
                    newer_than=newer,
                    limit=count,
                    now=now,
                )
        finally:
            engine.dispose()
    if as_json:
        _print_json(
            {
                "workflows": [
                    {**w.to_dict(), "age_seconds": round((now - w.created_at).total_seconds(), 3)}
                    for w in rows
                ],
                "count": len(rows),
                "limit": count,
                "filters": {
                    "state": wanted_state,
                    "outcome": wanted_outcome,
                    "name": name,
                    "older_than_seconds": older.total_seconds() if older else None,
                    "newer_than_seconds": newer.total_seconds() if newer else None,
                },
            }
        )
        return
    out = _stdout()
    if not rows:
        out.print("no workflows match")
        return
    out.print(_workflows_table(rows, now))
    more = (
        f"; there may be more: raise --limit (now {count}) or narrow the filters"
        if len(rows) == count
        else ""
    )
    noun = "workflow" if len(rows) == 1 else "workflows"
    out.print(Text(f"{len(rows)} {noun}, newest first{more}", style="dim"), soft_wrap=True)


def _workflows_table(rows: list[WorkflowSummary], now: datetime) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("name", min_width=8)
    table.add_column("state", no_wrap=True)
    # Columns would take every spare cell; at most as wide as the longest summary on one line.
    widest = max(len(" · ".join(f"{n} {label}" for label, n in w.labels.items())) for w in rows)
    table.add_column("control plane", min_width=min(14, widest), max_width=max(14, widest))
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    for w in rows:
        table.add_row(
            w.id,
            w.name,
            # A finished workflow is known by its outcome.
            _state_text(w.outcome or w.state, None)
            if w.outcome is None
            else Text(w.outcome, style=f"bold {render.OUTCOME_STYLES.get(w.outcome, '')}"),
            labels_text(w.labels),
            _done_text(w.counters),
            age_text(now - w.created_at),
        )
    return table


# -- evidence ---------------------------------------------------------------------------------


@app.command("evidence")
def evidence_command(
    workflow_id: WorkflowIdArgument,
    limit: Annotated[
        str, typer.Option("--limit", help="Show the latest N entries.", metavar="N")
    ] = str(DEFAULT_TIMELINE_LIMIT),
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Everything on record about a workflow, oldest first.

    Applied outcomes (attempts) and every event that did not simply apply: duplicate,
    late and ambiguous reports, deliveries, consumed and dropped completion events,
    signals, cancel requests, operator retries and replays, and the reconciler's
    recoveries. The `kind` and `classification` columns say which.

    **Example:** `streamflow evidence 01a213c9f22a43d4130de5f1c9ef1b34 --json`
    """
    with _edge():
        count = _whole(limit, "--limit")
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            with _bad_input(), read(engine) as conn:
                wf = workflow_row(conn, workflow_id)
                entries = evidence_timeline(conn, workflow_id, limit=count + 1)
        finally:
            engine.dispose()
    truncated = len(entries) > count
    entries = entries[-count:]
    if as_json:
        _print_json(
            {
                "workflow": {
                    "id": wf["id"],
                    "name": wf["name"],
                    "state": wf["state"],
                    "outcome": wf["outcome"],
                    "needs_review": wf["needs_review"],
                },
                "entries": [_jsonable(e) for e in entries],
                "truncated": truncated,
            }
        )
        return
    head = Text()
    head.append(f"{wf['name']} ({wf['id']})", style="bold")
    head.append("  ")
    head.append_text(_state_text(wf["state"], wf["outcome"]))
    if wf["needs_review"]:
        head.append("  needs review", style="magenta")
    created = wf["created_at"].astimezone(UTC)
    # Times of day when everything happened on the day the workflow was created.
    same_day = all(e["when"].astimezone(UTC).date() == created.date() for e in entries)
    head.append(f"\ncreated {_when(created)} UTC", style="dim")
    out = _stdout()
    # The time since the workflow was created, when the terminal has room for it.
    offsets = out.width >= 140
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("at (UTC)", no_wrap=True)
    if offsets:
        table.add_column("since start", no_wrap=True, justify="right")
    table.add_column("kind", no_wrap=True)
    table.add_column("classification", no_wrap=True)
    table.add_column("step", overflow="fold")
    table.add_column("#", no_wrap=True, justify="right")
    table.add_column("source", no_wrap=True, overflow="ellipsis", max_width=14)
    table.add_column("detail", min_width=24)
    for e in entries:
        classification = e["classification"] or "-"
        when = _when(e["when"])
        since = [_offset(e["when"] - wf["created_at"])] if offsets else []
        table.add_row(
            when[11:] if same_day else when,
            *since,
            e["kind"],
            Text(classification, style=STYLES.get(classification, "")),
            e["step"] or "-",
            "-" if e["attempt"] is None else str(e["attempt"]),
            e["source"] or "-",
            _entry_detail(e),
        )
    out.print(Group(head, Text(""), table))
    if truncated:
        out.print(
            Text(f"showing the latest {count} entries; older ones: raise --limit", style="dim")
        )


# -- retry ------------------------------------------------------------------------------------


@app.command("retry")
def retry_command(
    workflow_id: WorkflowIdArgument,
    step: StepArgument,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Why, kept with the evidence row.", show_default=False),
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a failed step round again: it becomes available and its cascade is undone.

    The step goes `failed` -> `available` (the dispatcher in `streamflow consume` or `run`
    sends it to its queue); if it had used all its attempts it gets exactly one more.
    Steps its failure cascade-cancelled go back to `pending`, and a finished workflow is
    running again. Recorded as `operator` evidence, classification `retried`. Only a
    `failed` step can be retried.

    **Example:** `streamflow retry 01a213c9f22a43d4130de5f1c9ef1b34 charge_card --reason "new card"`
    """
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            with _bad_input(), transaction(engine) as conn:
                result = retry_step(
                    conn,
                    workflow_id,
                    step,
                    reason=reason.strip() if reason and reason.strip() else None,
                    now=datetime.now(UTC),
                    source="cli",
                )
        finally:
            engine.dispose()
    if as_json:
        _print_json(result.to_dict())
        return
    out = _stdout()
    budget = (
        f"; max attempts raised from {result.max_attempts_before} to {result.max_attempts}"
        if result.max_attempts != result.max_attempts_before
        else ""
    )
    out.print(
        f"{step}: failed -> available; attempt {result.next_attempt} of {result.max_attempts} "
        f"runs next{budget}",
        soft_wrap=True,
    )
    back = [n for n in result.restored if n not in result.recancelled]
    if back:
        out.print("back to pending: " + ", ".join(back), soft_wrap=True)
    if result.recancelled:
        out.print(
            "cancelled again (another dependency still cancels them): "
            + ", ".join(result.recancelled),
            soft_wrap=True,
        )
    if result.reopened:
        out.print("the workflow had finished; it is running again", soft_wrap=True)
    out.print(
        "recorded as operator evidence (retried); a dispatcher (streamflow consume or run) "
        "sends the step to its queue",
        style="dim",
        soft_wrap=True,
    )


# -- replay -----------------------------------------------------------------------------------


@app.command("replay")
def replay_command(
    workflow_id: WorkflowIdArgument,
    step: StepArgument,
    attempt: Annotated[
        str | None,
        typer.Option(
            "--attempt",
            help="The attempt whose outcome to replay (default: the latest recorded).",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Why, kept with the evidence row.", show_default=False),
    ] = None,
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a step's recorded completion event again, on purpose.

    Records a `replayed` evidence row, then adds the event — the same attempt, status and
    idempotency key as the original — to the completion stream. A consumer then
    classifies the delivery like any other (`duplicate` when the original was consumed),
    and nothing in the workflow changes: a way to check that a replay is harmless, or to
    push an event that was never published. Needs Redis.

    **Example:** `streamflow replay 01a213c9f22a43d4130de5f1c9ef1b34 fetch_rates --attempt 1`
    """
    with _edge():
        number = _whole(attempt, "--attempt") if attempt is not None else None
    choice = _choose(database_url)
    url = _redis_url(redis_url)
    with _edge(choice):
        if url is None:
            raise CliError(
                "replay publishes to the completion stream, so it needs Redis: pass "
                "--redis-url or set STREAMFLOW_REDIS_URL",
                EXIT_USAGE,
            )
        keys = _keys()
        engine = _open(choice)
        try:
            publisher = Publisher(_connect_streams(url), keys)
            with _bad_input(), transaction(engine) as conn:
                target = record_replay(
                    conn,
                    workflow_id,
                    step,
                    attempt=number,
                    reason=reason.strip() if reason and reason.strip() else None,
                    now=datetime.now(UTC),
                    source="cli",
                )
        finally:
            engine.dispose()
        event = CompletionEvent(
            target.workflow_id,
            target.step,
            CompletionStatus(target.status),
            target.attempt,
            int(target.recorded_at.timestamp() * 1000),
        )
        if not publisher.publish_completion(event):
            raise CliError(
                f"recorded the replay of {event.idempotency_key} but could not publish it to "
                f"{keys.completions_for(target.workflow_id)}; run the command again",
                EXIT_ERROR,
            )
    summary = {
        "workflow_id": target.workflow_id,
        "step": target.step,
        "attempt": target.attempt,
        "status": target.status,
        "idempotency_key": event.idempotency_key,
        "stream": keys.completions_for(target.workflow_id),
        "published": True,
    }
    if as_json:
        _print_json(summary)
        return
    out = _stdout()
    out.print(
        f"{step}: replayed the completion event of attempt {target.attempt} "
        f"({target.status}) to {keys.completions_for(target.workflow_id)}",
        soft_wrap=True,
    )
    out.print(
        f"recorded as operator evidence (replayed); a consumer classifies the delivery — "
        f"see `streamflow evidence {workflow_id}`",
        style="dim",
        soft_wrap=True,
    )
