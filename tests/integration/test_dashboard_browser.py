"""The dashboard end to end in a real browser: Debian's Chromium, driven by Playwright,
against a real uvicorn serving a ledger on real PostgreSQL.

An order whose card charge failed for good: the steps that needed it were cascade-
cancelled. The operator opens the dashboard, finds the workflow under Needs Review, finds
the step held up by the failure and reads its blocker, opens the failed step, presses
retry, confirms, and sees the step Runnable again and its dependents waiting for it
instead of cancelled.

Set STREAMFLOW_TEST_SCREENSHOT=docs/dashboard.png to save the workflow page (the coloured
DAG) as the screenshot in the docs:

    STREAMFLOW_TEST_SCREENSHOT=docs/dashboard.png \\
        .venv/bin/pytest tests/integration/test_dashboard_browser.py
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import Engine

from ledger.claims import Claim, claim_step
from ledger.db import transaction
from streamflow import Dep, Workflow
from streamflow.dashboard import create_app
from streamflow.dashboard.security import LOOPBACK_NAMES
from tests.ledger.helpers import states
from tests.workers import Noop

pytestmark = pytest.mark.postgres

CHROMIUM = "/usr/bin/chromium"
#: Headless and quiet: no GPU, no QUIC, no first-run, update or sync traffic.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
#: Playwright's own waits (auto-waiting expectations, clicks, navigation).
TIMEOUT_MS = 10_000


def fulfilment() -> Workflow:
    return (
        Workflow.new("order_fulfilment", workflow_context={"order": 8812})
        .add("fetch_cart", Noop.new())
        .add("reserve_stock", Noop.new(), deps=["fetch_cart"])
        .add("charge_card", Noop.new(max_attempts=3), deps=["fetch_cart"])
        .add("send_receipt", Noop.new(), deps=["charge_card"])
        .add("ship_order", Noop.new(), deps=["reserve_stock", "charge_card"])
        .add("notify_customer", Noop.new(), deps=["ship_order"])
        .add("release_hold", Noop.new(), deps=[Dep("charge_card", policy="continue")])
        .add(
            "approve_refund",
            Noop.new(),
            deps=["fetch_cart"],
            await_signal="manager_approval",
        )
        .add("audit_log", Noop.new(), deps=["approve_refund"])
    )


def stuck_order(engine: Engine) -> str:
    """fetch_cart done, reserve_stock running, charge_card failed (the card was declined):
    send_receipt, ship_order and notify_customer cancelled with it."""
    wid = Workflow.insert(fulfilment(), engine).id
    Workflow.complete_step(engine, wid, "fetch_cart", status="completed", payload={"items": 3})
    with transaction(engine) as conn:
        claim = claim_step(
            conn, wid, "reserve_stock", owner="worker-7", lease_seconds=600, now=datetime.now(UTC)
        )
    assert isinstance(claim, Claim)
    Workflow.complete_step(
        engine, wid, "charge_card", status="failed", payload={"error": "card declined"}
    )
    return wid


@pytest.fixture
def dashboard(pg_engine: Engine) -> Iterator[str]:
    """A real uvicorn serving the dashboard on a free loopback port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # Listening before the server starts: the browser's first connection waits in the
    # backlog until uvicorn accepts it, so there is nothing to poll for.
    sock.listen(64)
    app = create_app(pg_engine, allowed_hosts=LOOPBACK_NAMES)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "the dashboard server did not stop"


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
            context.close()
        finally:
            browser.close()


def test_an_operator_finds_a_blocked_step_and_retries_its_failed_cause(
    pg_engine: Engine, dashboard: str, page: Page
) -> None:
    wid = stuck_order(pg_engine)
    cancelled = ("send_receipt", "ship_order", "notify_customer")
    assert {states(pg_engine, wid)[s] for s in cancelled} == {"cancelled"}

    # The list leads with what needs a person: the order is under Needs Review.
    page.goto(dashboard + "/")
    group = page.locator('section[data-group="Needs Review"]')
    row = group.locator(f'tr[data-workflow="{wid}"]')
    expect(row).to_contain_text("order_fulfilment")
    expect(row).to_contain_text("1 Needs Review")
    expect(row).to_contain_text("3 Cancelled")
    row.get_by_role("link", name="order_fulfilment").click()
    expect(page).to_have_url(re.compile(f"/workflows/{wid}$"))

    # The graph draws every step in its label's colour.
    nodes = page.locator("svg.dag a.node")
    expect(nodes).to_have_count(9)
    expect(page.locator('svg.dag a.node[data-step="charge_card"]')).to_have_attribute(
        "data-label", "Needs Review"
    )
    expect(page.locator("svg.dag path.edge")).to_have_count(9)
    screenshot = os.environ.get("STREAMFLOW_TEST_SCREENSHOT")
    if screenshot:
        page.screenshot(path=str(ROOT / screenshot), full_page=True)

    # Find the step held up by a blocker, and read the blocker.
    steps = page.locator("#steps")
    held = steps.locator("tr[data-step]").filter(
        has=page.locator("td.blockers", has_text="cancelled_by_dependency")
    )
    expect(held).to_have_count(3)
    ship = steps.locator('tr[data-step="ship_order"]')
    expect(ship.locator("td.blockers")).to_have_text("cancelled_by_dependency")
    expect(ship.locator("td.reason")).to_contain_text(
        "cancelled through its cancel edge from 'charge_card'"
    )
    expect(ship.locator("td.label")).to_have_text("Cancelled")

    # Open the failed step from the graph: Needs Review, step_failed.
    page.locator('svg.dag a.node[data-step="charge_card"]').click()
    expect(page).to_have_url(re.compile(f"/workflows/{wid}/steps/charge_card$"))
    expect(page.locator("#explain")).to_contain_text("Needs Review")
    expect(page.locator("#blockers")).to_have_text("step_failed")
    expect(page.locator("#timeline")).to_contain_text("card declined")

    # Retry: the confirmation says what will happen, then the retry is done.
    page.get_by_role("link", name="Retry…").click()
    expect(page.locator("#preview")).to_contain_text("attempt 2 of 3 runs next")
    expect(page.locator("#restored")).to_have_text("send_receipt, ship_order, notify_customer")
    page.get_by_label("reason").fill("customer updated the card")
    page.get_by_role("button", name="Retry charge_card").click()

    # Back on the workflow: the step is Runnable, its dependents wait for it again.
    expect(page).to_have_url(re.compile(f"/workflows/{wid}\\?done=retry&step=charge_card$"))
    expect(page.get_by_role("status")).to_contain_text("Retried charge_card")
    charge = steps.locator('tr[data-step="charge_card"]')
    expect(charge.locator("td.label")).to_have_text("Runnable")
    expect(charge.locator("td.state")).to_have_text("available")
    for name in cancelled:
        expect(steps.locator(f'tr[data-step="{name}"] td.state')).to_have_text("pending")
        expect(steps.locator(f'tr[data-step="{name}"] td.label')).to_have_text("Waiting")
    expect(page.locator('svg.dag a.node[data-step="charge_card"]')).to_have_attribute(
        "data-label", "Runnable"
    )
    now = states(pg_engine, wid)
    assert now["charge_card"] == "available"
    assert {now[s] for s in cancelled} == {"pending"}
