"""The dashboard app through Starlette's TestClient on a SQLite ledger: every page renders
with the ledger's labels and counts, actions go through a confirmation, bad input is a 400
page, unknown ids a 404 page, and the token rule holds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from ledger import tables as t
from ledger.operator import evidence_timeline
from streamflow import Dep, Workflow
from streamflow.dashboard import create_app
from streamflow.dashboard.security import LOOPBACK_NAMES
from streamflow.dashboard.theme import LABEL_COLOURS
from tests.ledger.helpers import states
from tests.workers import Noop


def checkout() -> Workflow:
    """fetch_cart done, charge failed: receipt and archive cascade-cancelled, release_hold
    released through its continue edge, approve waiting for its signal."""
    return (
        Workflow.new("checkout")
        .add("fetch_cart", Noop.new())
        .add("charge", Noop.new(max_attempts=3), deps=["fetch_cart"])
        .add("receipt", Noop.new(), deps=["charge"])
        .add("archive", Noop.new(), deps=["receipt"])
        .add("release_hold", Noop.new(), deps=[Dep("charge", policy="continue")])
        .add("approve", Noop.new(), deps=["fetch_cart"], await_signal="manager_approval")
    )


def failed_checkout(engine: Engine) -> str:
    wid = Workflow.insert(checkout(), engine).id
    Workflow.complete_step(engine, wid, "fetch_cart", status="completed", payload={"cart": 7})
    Workflow.complete_step(engine, wid, "charge", status="failed", payload={"e": "declined"})
    return wid


@pytest.fixture
def client(sqlite_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite_engine), follow_redirects=False) as c:
        yield c


def rows(html: str, table: str) -> dict[str, str]:
    """`{data-step: the row's html}` of the table with id `table`."""
    body = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r'<tr data-step="([^"]+)">(.*?)</tr>', body, re.S))


def cell(row: str, name: str) -> str:
    match = re.search(rf'<td class="{name}[^"]*">(.*?)</td>', row, re.S)
    assert match, row
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def evidence_count(engine: Engine, wid: str) -> int:
    with engine.connect() as conn:
        return len(evidence_timeline(conn, wid))


# -- reads ----------------------------------------------------------------------------------------


def test_workflows_page_groups_by_most_urgent_label_with_counts(
    client: TestClient, sqlite_engine: Engine
) -> None:
    failed = failed_checkout(sqlite_engine)
    chain = Workflow.new("chain").add("a", Noop.new()).add("b", Noop.new(), deps=["a"])
    waiting = Workflow.insert(chain, sqlite_engine).id
    done = Workflow.insert(Workflow.new("one").add("a", Noop.new()), sqlite_engine).id
    Workflow.complete_step(sqlite_engine, done, "a", status="completed")

    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    # Sections lead with the urgent labels; each workflow sits under its most urgent one.
    groups = re.findall(r'<section class="group" data-group="([^"]+)">', html)
    assert groups == ["Needs Review", "Waiting", "Done"]
    sections = dict(re.findall(r'data-group="([^"]+)">(.*?)</section>', html, re.S))
    assert failed in sections["Needs Review"] and waiting in sections["Waiting"]
    assert done in sections["Done"]
    # Tiles, in operator order: workflows with such a step, and steps.
    tiles = re.findall(
        r'data-tile="([^"]+)">\s*<div class="n">(\d+)</div>.*?(\d+) workflows? · (\d+) steps?',
        html,
        re.S,
    )
    assert [(label, int(w), int(s)) for label, _, w, s in tiles] == [
        ("Needs Review", 1, 1),
        ("Blocked", 0, 0),
        ("Waiting", 2, 2),
        ("Runnable", 2, 2),
        ("Running", 0, 0),
        ("Cancelled", 1, 2),
        ("Done", 2, 2),
    ]
    # Raw semantics beneath the labels.
    assert "pending 1 · runnable 1 · executing 0 · retryable 0 · completed 1 · failed 1" in html


def test_workflows_page_filters_like_the_cli(client: TestClient, sqlite_engine: Engine) -> None:
    failed = failed_checkout(sqlite_engine)
    running = Workflow.insert(Workflow.new("one").add("a", Noop.new()), sqlite_engine).id

    def listed(query: str) -> set[str]:
        page = client.get("/" + query)
        assert page.status_code == 200, page.text
        return set(re.findall(r'<tr data-workflow="([^"]+)"', page.text)) & {failed, running}

    assert listed("") == {failed, running}
    assert listed("?name=checkout") == {failed}
    assert listed("?state=running&newer_than=1h") == {failed, running}
    assert listed("?older_than=1h") == set()
    assert listed("?limit=1") == {running}
    finished = Workflow.insert(Workflow.new("one").add("a", Noop.new()), sqlite_engine).id
    Workflow.complete_step(sqlite_engine, finished, "a", status="completed")
    page = client.get("/?outcome=completed")
    assert finished in page.text and running not in page.text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?state=sleeping", "state must be one of running, finished"),
        ("?outcome=maybe", "outcome must be one of completed, failed, cancelled"),
        ("?older_than=soon", "older than must be a duration like 30s"),
        ("?newer_than=0s", "newer than must be longer than zero"),
        ("?limit=0", "limit must be a whole number from 1 to 1000"),
        ("?limit=ten", "limit must be a whole number"),
        ("?state=running&outcome=failed", "a running workflow has no outcome yet"),
    ],
)
def test_bad_filters_are_a_400_with_the_reason(
    client: TestClient, query: str, message: str
) -> None:
    page = client.get("/" + query)
    assert page.status_code == 400
    assert message in page.text
    assert 'class="error"' in page.text and "Traceback" not in page.text


def test_workflow_page_draws_the_dag_coloured_by_label(
    client: TestClient, sqlite_engine: Engine
) -> None:
    wid = failed_checkout(sqlite_engine)
    page = client.get(f"/workflows/{wid}")
    assert page.status_code == 200
    html = page.text
    nodes = re.findall(
        r'<a class="node" href="([^"]+)" data-step="([^"]+)" data-label="([^"]+)">.*?'
        r'fill="(#[0-9a-f]{6})"',
        html,
        re.S,
    )
    labels = {step: label for _, step, label, _ in nodes}
    assert labels == {
        "fetch_cart": "Done",
        "charge": "Needs Review",
        "receipt": "Cancelled",
        "archive": "Cancelled",
        "release_hold": "Runnable",
        "approve": "Waiting",
    }
    for href, step, label, fill in nodes:
        assert fill == LABEL_COLOURS[label]
        assert href == f"/workflows/{wid}/steps/{step}"
    edges = re.findall(r'<path class="edge" data-from="([^"]+)" data-to="([^"]+)"', html)
    assert sorted(edges) == sorted(
        [
            ("fetch_cart", "charge"),
            ("charge", "receipt"),
            ("receipt", "archive"),
            ("charge", "release_hold"),
            ("fetch_cart", "approve"),
        ]
    )
    assert html.count('stroke-dasharray="5 4"') == 1  # the one continue edge
    # The legend names every label.
    legend = html.split('class="legend"', 1)[1].split("</div>", 1)[0]
    assert all(label in legend for label in LABEL_COLOURS)

    table = rows(html, "steps")
    assert list(table) == ["fetch_cart", "charge", "receipt", "archive", "release_hold", "approve"]
    assert cell(table["receipt"], "label") == "Cancelled"
    assert cell(table["receipt"], "state") == "cancelled"
    assert cell(table["receipt"], "blockers") == "cancelled_by_dependency"
    assert "cancelled through its cancel edge from &#39;charge&#39;" in table["receipt"]
    assert cell(table["charge"], "blockers") == "step_failed"
    assert cell(table["approve"], "blockers") == "awaiting_signal"
    assert re.search(r"<td class=\"mono\">1/3</td>", table["charge"])


def test_step_page_has_the_explain_facts_and_the_timeline(
    client: TestClient, sqlite_engine: Engine
) -> None:
    wid = failed_checkout(sqlite_engine)
    e = Workflow.get(sqlite_engine, wid)
    page = client.get(f"/workflows/{wid}/steps/archive")
    assert page.status_code == 200
    html = page.text
    assert 'data-label="Cancelled"' in html
    assert (
        "cancelled through its cancel edge from &#39;receipt&#39;, which was cancelled because"
        in html
    )
    assert re.search(r'id="state">cancelled<', html)
    assert re.search(r'id="blockers">cancelled_by_dependency<', html)
    assert "root cause <a" in html
    deps = html.split('id="dependencies"', 1)[1].split("</table>", 1)[0]
    assert "receipt" in deps and "cancelled" in deps
    timeline = html.split('id="timeline"', 1)[1]
    assert "declined" in timeline  # charge's failed attempt, with its payload
    assert timeline.count("<tr") == 1 + 3  # header; inserted and the two attempts
    assert e.name in html

    charge = client.get(f"/workflows/{wid}/steps/charge").text
    assert 'data-label="Needs Review"' in charge and f"/workflows/{wid}/retry/charge" in charge
    approve = client.get(f"/workflows/{wid}/steps/approve").text
    assert f"/workflows/{wid}/signal/approve" in approve and "manager_approval" in approve


@pytest.mark.parametrize(
    "path",
    [
        "/workflows/nope",
        "/workflows/nope/steps/a",
        "/workflows/{wid}/steps/nope",
        "/workflows/{wid}/retry/nope",
        "/workflows/{wid}/signal/nope",
        "/workflows/nope/cancel",
        "/no/such/page",
    ],
)
def test_unknown_ids_are_a_404_page(client: TestClient, sqlite_engine: Engine, path: str) -> None:
    wid = failed_checkout(sqlite_engine)
    page = client.get(path.format(wid=wid))
    assert page.status_code == 404
    assert "<h1>Not found</h1>" in page.text and "Traceback" not in page.text
    post = client.post(path.format(wid=wid), data={})
    assert post.status_code in (404, 405)


def test_a_step_name_with_a_slash_and_markup_is_escaped_and_reachable(
    client: TestClient, sqlite_engine: Engine
) -> None:
    name = "a/<b>&c"
    wid = Workflow.insert(Workflow.new("odd").add(name, Noop.new()), sqlite_engine).id
    html = client.get(f"/workflows/{wid}").text
    assert "<b>" not in html and "a/&lt;b&gt;&amp;c" in html
    page = client.get(f"/workflows/{wid}/steps/a%2F%3Cb%3E%26c")
    assert page.status_code == 200 and "Runnable" in page.text


# -- actions --------------------------------------------------------------------------------------


def test_retry_is_confirmed_then_done(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    before = states(sqlite_engine, wid)
    entries = evidence_count(sqlite_engine, wid)

    confirm = client.get(f"/workflows/{wid}/retry/charge")
    assert confirm.status_code == 200
    assert "attempt 2 of 3 runs next" in confirm.text
    assert re.search(r'id="restored">receipt, archive<', confirm.text)
    assert f'action="/workflows/{wid}/retry/charge"' in confirm.text
    # The preview wrote nothing.
    assert states(sqlite_engine, wid) == before
    assert evidence_count(sqlite_engine, wid) == entries

    done = client.post(f"/workflows/{wid}/retry/charge", data={"reason": "new card"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/workflows/{wid}?done=retry&step=charge"
    after = states(sqlite_engine, wid)
    assert (after["charge"], after["receipt"], after["archive"]) == (
        "available",
        "pending",
        "pending",
    )
    page = client.get(done.headers["location"])
    assert "Retried charge" in page.text
    table = rows(page.text, "steps")
    assert cell(table["charge"], "label") == "Runnable"
    assert cell(table["receipt"], "label") == "Waiting"
    with sqlite_engine.connect() as conn:
        retried = [e for e in evidence_timeline(conn, wid) if e["classification"] == "retried"]
    assert [(e["step"], e["source"]) for e in retried] == [("charge", "dashboard")]
    assert retried[0]["detail"]["payload"]["reason"] == "new card"


def test_retry_of_a_step_that_did_not_fail_is_a_400_with_the_ledgers_reason(
    client: TestClient, sqlite_engine: Engine
) -> None:
    wid = failed_checkout(sqlite_engine)
    entries = evidence_count(sqlite_engine, wid)
    confirm = client.get(f"/workflows/{wid}/retry/receipt")
    assert confirm.status_code == 400
    assert "retry &#39;charge&#39; instead" in confirm.text
    assert "<form" not in confirm.text
    post = client.post(f"/workflows/{wid}/retry/receipt", data={})
    assert post.status_code == 400 and "retry &#39;charge&#39; instead" in post.text
    assert evidence_count(sqlite_engine, wid) == entries


def test_cancel_is_confirmed_then_done(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    confirm = client.get(f"/workflows/{wid}/cancel")
    assert confirm.status_code == 200
    assert "2 unfinished steps will be cancelled: <strong>release_hold, approve</strong>" in (
        confirm.text
    )
    assert Workflow.cancel_requests(sqlite_engine, wid) == []

    done = client.post(f"/workflows/{wid}/cancel", data={"reason": "order withdrawn"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/workflows/{wid}?done=cancel&effect=applied"
    record = Workflow.get(sqlite_engine, wid)
    assert (record.state, record.outcome) == ("finished", "cancelled")
    [request] = Workflow.cancel_requests(sqlite_engine, wid)
    assert (request.reason, request.requested_by) == ("order withdrawn", "dashboard")
    page = client.get(done.headers["location"])
    assert "the workflow is cancelled" in page.text and "finished · cancelled" in page.text

    again = client.get(f"/workflows/{wid}/cancel")
    assert "already cancelled" in again.text


def test_signal_is_confirmed_then_sent(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    confirm = client.get(f"/workflows/{wid}/signal/approve")
    assert confirm.status_code == 200
    assert "manager_approval" in confirm.text and "releases it now" in confirm.text
    assert Workflow.signals(sqlite_engine, wid) == []

    done = client.post(
        f"/workflows/{wid}/signal/approve",
        data={"payload": '{"approved": true}', "dedupe_key": "k1"},
    )
    assert done.status_code == 303
    assert "classification=consumed" in done.headers["location"]
    [sig] = Workflow.signals(sqlite_engine, wid)
    assert (sig.name, sig.payload, sig.classification) == (
        "manager_approval",
        {"approved": True},
        "consumed",
    )
    assert states(sqlite_engine, wid)["approve"] == "available"
    assert "Signal for approve: consumed" in client.get(done.headers["location"]).text


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{approved: yes}", "the payload is not valid JSON"),
        ("NaN", "NaN is not JSON"),
        ("[1e999]", "a number is out of range"),
    ],
)
def test_a_malformed_signal_payload_is_a_400_and_nothing_is_sent(
    client: TestClient, sqlite_engine: Engine, payload: str, message: str
) -> None:
    wid = failed_checkout(sqlite_engine)
    post = client.post(f"/workflows/{wid}/signal/approve", data={"payload": payload})
    assert post.status_code == 400
    assert message in post.text
    assert "{approved: yes}" in post.text or payload != "{approved: yes}"  # kept in the form
    assert Workflow.signals(sqlite_engine, wid) == []


def test_a_signal_for_a_step_that_awaits_none_is_a_400(
    client: TestClient, sqlite_engine: Engine
) -> None:
    wid = failed_checkout(sqlite_engine)
    page = client.get(f"/workflows/{wid}/signal/receipt")
    assert page.status_code == 400 and "awaits no signal" in page.text
    post = client.post(f"/workflows/{wid}/signal/receipt", data={"payload": "1"})
    assert post.status_code == 400
    assert Workflow.signals(sqlite_engine, wid) == []


def test_a_form_that_is_not_urlencoded_is_a_400(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    post = client.post(f"/workflows/{wid}/retry/charge", json={"reason": "x"})
    assert post.status_code == 400 and "application/x-www-form-urlencoded" in post.text
    assert states(sqlite_engine, wid)["charge"] == "failed"


def test_a_post_from_another_sites_page_is_refused(
    client: TestClient, sqlite_engine: Engine
) -> None:
    wid = failed_checkout(sqlite_engine)
    post = client.post(
        f"/workflows/{wid}/retry/charge", data={}, headers={"Origin": "http://evil.example"}
    )
    assert post.status_code == 403 and "another site" in post.text
    assert states(sqlite_engine, wid)["charge"] == "failed"
    same = client.post(
        f"/workflows/{wid}/retry/charge", data={}, headers={"Origin": "http://testserver"}
    )
    assert same.status_code == 303


# -- the token rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "headers", "status"),
    [
        ({}, {}, 403),
        ({"token": "wrong"}, {}, 403),
        ({"token": "s3cret-tøken"}, {}, 303),
        ({}, {"X-Streamflow-Token": "s3cret-t"}, 403),
        ({}, {"Authorization": "Bearer nope"}, 403),
    ],
)
def test_actions_need_the_token_when_one_is_set(
    sqlite_engine: Engine, form: dict[str, str], headers: dict[str, str], status: int
) -> None:
    wid = failed_checkout(sqlite_engine)
    with TestClient(create_app(sqlite_engine, token="s3cret-tøken"), follow_redirects=False) as c:
        # Read pages stay open; the confirmation asks for the token.
        assert c.get("/").status_code == 200
        confirm = c.get(f"/workflows/{wid}/retry/charge")
        assert confirm.status_code == 200 and 'name="token"' in confirm.text
        post = c.post(f"/workflows/{wid}/retry/charge", data=form, headers=headers)
    assert post.status_code == status
    assert states(sqlite_engine, wid)["charge"] == ("available" if status == 303 else "failed")
    if status == 403:
        assert "a valid token is required" in post.text


@pytest.mark.parametrize("header", ["X-Streamflow-Token", "Authorization"])
def test_the_token_may_come_in_a_header(sqlite_engine: Engine, header: str) -> None:
    wid = failed_checkout(sqlite_engine)
    value = "Bearer abc123" if header == "Authorization" else "abc123"
    with TestClient(create_app(sqlite_engine, token="abc123"), follow_redirects=False) as c:
        post = c.post(f"/workflows/{wid}/cancel", data={}, headers={header: value})
    assert post.status_code == 303
    assert Workflow.get(sqlite_engine, wid).outcome == "cancelled"


def test_without_a_token_no_token_field_is_shown(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    assert 'name="token"' not in client.get(f"/workflows/{wid}/cancel").text


def test_a_loopback_dashboard_answers_loopback_host_names_only(sqlite_engine: Engine) -> None:
    app = create_app(sqlite_engine, allowed_hosts=LOOPBACK_NAMES)
    for base, status in (
        ("http://127.0.0.1:8080", 200),
        ("http://localhost:8080", 200),
        ("http://[::1]:8080", 200),
        ("http://rebound.example:8080", 400),
    ):
        with TestClient(app, base_url=base) as c:
            assert c.get("/").status_code == status, base


# -- failures -------------------------------------------------------------------------------------


def test_a_database_without_the_tables_is_a_503_page_not_a_traceback(tmp_path: Any) -> None:
    from ledger.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with TestClient(create_app(engine)) as c:
            page = c.get("/")
    finally:
        engine.dispose()
    assert page.status_code == 503
    assert "cannot use the database" in page.text and "Traceback" not in page.text


def test_reads_write_nothing(client: TestClient, sqlite_engine: Engine) -> None:
    wid = failed_checkout(sqlite_engine)
    with sqlite_engine.connect() as conn:
        before = conn.execute(select(t.workflows.c.updated_at)).all()
    for path in ("/", f"/workflows/{wid}", f"/workflows/{wid}/steps/charge"):
        assert client.get(path).status_code == 200
    for path in ("cancel", "retry/charge", "signal/approve"):
        assert client.get(f"/workflows/{wid}/{path}").status_code == 200
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(t.workflows.c.updated_at)).all() == before
    assert Workflow.cancel_requests(sqlite_engine, wid) == []
