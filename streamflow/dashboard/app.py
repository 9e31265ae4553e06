"""The dashboard's Starlette app: server-rendered pages over the ledger, and three actions.

    GET  /                                  workflows grouped by control-plane label
    GET  /workflows/{id}                    one workflow: the DAG as SVG, the steps table
    GET  /workflows/{id}/steps/{step}       a step: its explain report, the evidence timeline
    GET  /workflows/{id}/cancel             confirm a cancel   (POST: do it)
    GET  /workflows/{id}/retry/{step}       confirm a retry    (POST: do it)
    GET  /workflows/{id}/signal/{step}      confirm a signal   (POST: do it)

Reads run in Starlette's thread pool (the ledger is synchronous SQLAlchemy). A POST checks
where it comes from and the token (`security`), acts, and redirects (303) to the workflow's
page, which says what was done. Unknown ids answer 404, input the ledger refuses 400 with
its message in the page, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ledger.errors import InvalidCompletionError, StepNotFoundError, WorkflowNotFoundError
from ledger.operator import OperatorError
from ledger.signals import InvalidSignalError
from streamflow.builder import Workflow
from streamflow.commands.operator import STYLES, _entry_detail, age_text
from streamflow.dashboard import actions, graph
from streamflow.dashboard.data import BadInput, Filters, overview, step_page, workflow_page
from streamflow.dashboard.security import (
    HostGuard,
    cross_origin,
    supplied_token,
    token_ok,
)
from streamflow.dashboard.theme import LABEL_COLOURS, LABELS, css_class, label_colour
from streamflow.explain import Explain

log = logging.getLogger("streamflow.dashboard")

#: Refusals from the ledger that are the request's fault: HTTP 400 with the message.
REFUSED = (BadInput, OperatorError, InvalidSignalError, InvalidCompletionError)
#: The largest form body accepted (a signal payload is at most 64 KiB of it).
MAX_FORM_BYTES = 256 * 1024

SIGNAL_MEANINGS = {
    "consumed": "it matched the waiting await and released the step",
    "recorded": "the step's dependencies are not done yet; it is held and releases the "
    "step when they are",
    "duplicate": "its dedupe key was used before with the same payload; nothing changed",
    "ambiguous": "its dedupe key was used before with another payload; the first stands and "
    "the step is flagged for review",
    "late": "the await had already resolved, expired or its step ended; nothing changed",
    "unmatched": "no step of the workflow awaits it",
}
CANCEL_MEANINGS = {
    "applied": "the workflow is cancelled: every unfinished step was cancelled",
    "repeated": "the workflow was already cancelled; the request is recorded, nothing else changed",
    "finished": "the workflow had already finished; its outcome stands and the request is recorded",
}


def workflow_url(workflow_id: str, **query: str) -> str:
    url = f"/workflows/{quote(workflow_id, safe='')}"
    return url + ("?" + urlencode(query) if query else "")


def step_url(workflow_id: str, step: str) -> str:
    return f"{workflow_url(workflow_id)}/steps/{quote(step, safe='')}"


def action_url(workflow_id: str, action: str, step: str | None = None) -> str:
    tail = f"/{quote(step, safe='')}" if step is not None else ""
    return f"{workflow_url(workflow_id)}/{action}{tail}"


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _since(value: datetime, start: datetime) -> str:
    seconds = (value - start).total_seconds()
    return f"+{seconds:.3f}s" if seconds < 60 else "+" + age_text(value - start)


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("streamflow.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        workflow_url=workflow_url,
        step_url=step_url,
        action_url=action_url,
        label_colour=label_colour,
        LABELS=LABELS,
        LABEL_COLOURS=LABEL_COLOURS,
        age_text=age_text,
        when=_when,
        since=_since,
        entry_detail=_entry_detail,
        classification_class=lambda c: css_class(STYLES.get(c or "", "")),
    )
    return env


class Dashboard:
    """The pages and actions over one ledger `engine`; `token` guards the actions."""

    def __init__(self, engine: Engine, token: str | None) -> None:
        self.engine = engine
        self.token = token
        self.env = _environment()

    # -- rendering ----------------------------------------------------------------------------

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            token_required=self.token is not None, **context
        )
        return HTMLResponse(html, status_code=status)

    def error(self, status: int, title: str, message: str) -> HTMLResponse:
        return self.page("error.html", status, title=title, message=message)

    # -- reads --------------------------------------------------------------------------------

    def workflows(self, request: Request) -> Response:
        filters = Filters.from_query(request.query_params)
        now = datetime.now(UTC)
        try:
            data = overview(self.engine, filters, now)
        except BadInput as exc:
            return self.page("workflows.html", 400, filters=filters, error=str(exc), data=None)
        return self.page("workflows.html", filters=filters, data=data, now=now, error=None)

    def workflow(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        data = workflow_page(self.engine, workflow_id)
        plan = graph.layout(data.views)
        drawing = Markup(graph.svg(plan, lambda step: step_url(workflow_id, step)))
        return self.page(
            "workflow.html",
            data=data,
            record=data.record,
            drawing=drawing,
            omitted=plan.omitted,
            notice=_notice(request.query_params, set(data.record.steps)),
        )

    def step(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        data = step_page(self.engine, workflow_id, request.path_params["step"])
        return self.page("step.html", data=data, e=data.explanation)

    # -- actions ------------------------------------------------------------------------------

    def _confirm(
        self,
        request: Request,
        action: str,
        form: Mapping[str, str],
        error: str | None,
        status: int,
    ) -> Response:
        """The confirmation page of `action`, with the ledger's preview of it."""
        workflow_id = request.path_params["workflow_id"]
        step = request.path_params.get("step")
        context: dict[str, Any] = {"action": action, "workflow_id": workflow_id, "step": step}
        problem = None
        try:
            if action == "cancel":
                context["record"] = Workflow.get(self.engine, workflow_id)
                context["preview"] = actions.preview_cancel(self.engine, workflow_id)
            else:
                assert step is not None
                context["e"] = Explain.workflow_step(workflow_id, step, repo=self.engine)
                if action == "retry":
                    context["preview"] = actions.preview_retry(self.engine, workflow_id, step)
                else:
                    context["preview"] = actions.awaited_signal(self.engine, workflow_id, step)
        except REFUSED as exc:
            problem = str(exc)
            status = max(status, 400)
        return self.page(
            "confirm.html",
            status,
            form=form,
            error=error,
            problem=problem,
            post_url=request.url.path,
            **context,
        )

    def confirm(self, request: Request, action: str) -> Response:
        return self._confirm(request, action, {}, None, 200)

    async def act(self, request: Request, action: str) -> Response:
        def again(form: Mapping[str, str], error: str, status: int) -> Awaitable[Response]:
            return run_in_threadpool(self._confirm, request, action, form, error, status)

        try:
            form = await _read_form(request)
        except BadInput as exc:
            return await again({}, str(exc), 400)
        if cross_origin(request.headers, request.url.scheme):
            return await again(form, "refused: the form was sent from another site's page", 403)
        if not token_ok(self.token, supplied_token(form, request.headers)):
            message = (
                "a valid token is required for actions on this dashboard (the one "
                "`streamflow dashboard` printed at start, or its --token)"
            )
            return await again(form, message, 403)
        try:
            target = await run_in_threadpool(self._do, request, action, form)
        except REFUSED as exc:
            return await again(form, str(exc), 400)
        return RedirectResponse(target, status_code=303)

    def _do(self, request: Request, action: str, form: Mapping[str, str]) -> str:
        """Carry out the action; the URL to show next."""
        workflow_id = request.path_params["workflow_id"]
        step = request.path_params.get("step")
        reason = actions.clean_reason(form.get("reason", ""))
        if action == "cancel":
            done = actions.cancel(self.engine, workflow_id, reason)
            log.info("cancel %s: %s", workflow_id, done.effect)
            return workflow_url(workflow_id, done="cancel", effect=done.effect)
        assert step is not None
        if action == "retry":
            actions.retry(self.engine, workflow_id, step, reason)
            log.info("retry %s %s", workflow_id, step)
            return workflow_url(workflow_id, done="retry", step=step)
        payload = actions.parse_payload(form.get("payload", ""))
        dedupe_key = form.get("dedupe_key", "").strip() or None
        result = actions.signal(self.engine, workflow_id, step, payload, dedupe_key)
        log.info("signal %s %s: %s", workflow_id, step, result.classification)
        return workflow_url(
            workflow_id, done="signal", step=step, classification=result.classification
        )

    # -- errors -------------------------------------------------------------------------------

    def not_found(self, request: Request, exc: Exception) -> Response:
        return self.error(404, "Not found", str(exc))

    def bad_input(self, request: Request, exc: Exception) -> Response:
        return self.error(400, "Bad request", str(exc))

    def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        titles = {404: "Not found", 405: "Method not allowed"}
        detail = "there is no such page" if exc.status_code == 404 else str(exc.detail)
        return self.error(exc.status_code, titles.get(exc.status_code, "Error"), detail)

    def database_error(self, request: Request, exc: Exception) -> Response:
        source = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        first = (str(source).strip().splitlines() or [type(source).__name__])[0]
        log.error("database error on %s: %s", request.url.path, first)
        return self.error(503, "Database unavailable", f"cannot use the database: {first}")

    def server_error(self, request: Request, exc: Exception) -> Response:
        # The traceback goes to the server's log (uvicorn prints it), never to the page.
        return self.error(500, "Internal error", "something went wrong; the server log has it")


async def _read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (what the pages' forms send); BadInput for anything else."""
    body = await request.body()
    if not body:
        return {}  # a form with no fields, or a script sending only a token header
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadInput("send the form as application/x-www-form-urlencoded")
    if len(body) > MAX_FORM_BYTES:
        raise BadInput(f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"the form could not be read: {exc}") from None


def _notice(query: Mapping[str, str], steps: set[str]) -> str | None:
    """What the action just done did, from the redirect's query (fixed words only)."""
    done, step = query.get("done"), query.get("step")
    if step is not None and step not in steps:
        return None
    if done == "retry" and step:
        return (
            f"Retried {step}: it is available again and a dispatcher sends it to its "
            "queue; the steps its failure had cancelled wait for it again."
        )
    if done == "cancel" and query.get("effect") in CANCEL_MEANINGS:
        return f"Cancel request recorded: {CANCEL_MEANINGS[query['effect']]}."
    classification = query.get("classification", "")
    if done == "signal" and step and classification in SIGNAL_MEANINGS:
        return f"Signal for {step}: {classification} — {SIGNAL_MEANINGS[classification]}."
    return None


def _bind(endpoint: Callable[[Request, str], Response], action: str) -> Callable[..., Response]:
    def bound(request: Request) -> Response:
        return endpoint(request, action)

    return bound


def _bind_async(
    endpoint: Callable[[Request, str], Awaitable[Response]], action: str
) -> Callable[..., Awaitable[Response]]:
    async def bound(request: Request) -> Response:
        return await endpoint(request, action)

    return bound


def create_app(
    engine: Engine, *, token: str | None = None, allowed_hosts: frozenset[str] | None = None
) -> Starlette:
    """The dashboard over `engine` (the caller disposes of it).

    `token`: required on every POST when set. `allowed_hosts`: when set, requests with any
    other Host header are refused (the CLI sets the loopback names when bound to loopback).
    """
    d = Dashboard(engine, token)
    routes = [
        Route("/", d.workflows, methods=["GET"]),
        Route("/workflows/{workflow_id}", d.workflow, methods=["GET"]),
        Route("/workflows/{workflow_id}/steps/{step:path}", d.step, methods=["GET"]),
    ]
    for action, path in (
        ("cancel", "/workflows/{workflow_id}/cancel"),
        ("retry", "/workflows/{workflow_id}/retry/{step:path}"),
        ("signal", "/workflows/{workflow_id}/signal/{step:path}"),
    ):
        routes += [
            Route(path, _bind(d.confirm, action), methods=["GET"]),
            Route(path, _bind_async(d.act, action), methods=["POST"]),
        ]
    handlers: dict[Any, Callable[[Request, Exception], Response]] = {
        WorkflowNotFoundError: d.not_found,
        StepNotFoundError: d.not_found,
        BadInput: d.bad_input,
        HTTPException: d.http_error,
        DBAPIError: d.database_error,
        Exception: d.server_error,
    }
    middleware = [Middleware(HostGuard, allowed=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)
