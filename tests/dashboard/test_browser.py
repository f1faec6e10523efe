"""The dashboard in a real headless Chromium, over the eshop run with audit on (SQLite transport).

The eshop's five processes run the demo's scenario with `TIDINGS_AUDIT=1` while the dashboard runs
as a process of its own; then the browser finds alice's checkout by her order id and reads the
sequence diagram (basket -> ordering -> catalog -> payment -> ordering, in causal order), sees
carol's declined payment, and replays a message that failed into an error queue, watching it
become handled on the page without a reload.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from examples.eshop.run import run_demo
from tests.dashboard.browser import chromium, keep
from tests.dashboard.server import dashboard
from tests.helpers import running
from tidings import Bus, Command, Context, RetryPolicy
from tidings.audit import AuditSettings

pytestmark = pytest.mark.slow

ARROWS = "els => els.map(e => [e.dataset.from, e.dataset.to, e.dataset.type, e.dataset.outcome])"


class Post(Command, name="ledger.post"):
    entry: str


def in_order(receivers: list[str], wanted: list[str]) -> bool:
    """Whether `wanted` appears in `receivers` in this order (other arrows may come between)."""
    position = 0
    for receiver in receivers:
        if position < len(wanted) and receiver == wanted[position]:
            position += 1
    return position == len(wanted)


async def arrows(page: Page) -> list[list[str]]:
    found: list[list[str]] = await page.eval_on_selector_all("svg.sequence g.arrow", ARROWS)
    return found


async def shot(page: Page, directory: Path, name: str) -> None:
    path = directory / name
    await page.screenshot(path=str(path), full_page=True)
    keep(path)


async def conversation(page: Page, base: str, correlation_id: str, ready: Any) -> list[list[str]]:
    """Open a conversation, reloading until `ready(arrows)` (the last records may be on their way)."""
    for _ in range(100):
        await page.goto(f"{base}/conversation?id={correlation_id}")
        found = await arrows(page)
        if ready(found):
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"conversation {correlation_id}: {found}")


async def test_the_eshop_in_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executable = chromium()
    monkeypatch.setenv("TIDINGS_AUDIT", "1")  # every eshop process, and the demo's tap, audit
    transport = f"sqlite:///{tmp_path / 'bus.db'}"
    shots = tmp_path / "shots"
    shots.mkdir()
    with dashboard(transport, tmp_path / "dashboard.db") as server:
        result = await run_demo(transport, tmp_path, out=io.StringIO())
        assert result.problems == []
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                await _look(browser, server.url, result.outcome.orders, shots)
                await _replay(browser, server.url, transport, shots)
            finally:
                await browser.close()


async def _look(browser: Browser, base: str, orders: dict[str, str], shots: Path) -> None:
    page = await browser.new_page(viewport={"width": 1500, "height": 900})

    def settled(found: list[list[str]]) -> bool:
        return any(kind == "OrderConfirmed" and to == "catalog" for _, to, kind, _ in found)

    # The dashboard ingests as the services go: wait until it has the end of alice's checkout.
    await conversation(page, base, "checkout-alice", settled)
    # Found by a value in a message body: alice's order id. Her checkout, and the gateway's
    # requests that followed the order (correlation id watch-alice), are its conversations.
    await page.goto(f"{base}/conversations")
    await page.fill("input[name=q]", orders["alice"])
    await page.click("form.search button")
    await page.wait_for_load_state()
    if "/conversations" in page.url:  # more than one: the list (one goes straight to it)
        await page.click("table.conversations a[href='/conversation?id=checkout-alice']")
    await page.wait_for_url("**/conversation?id=checkout-alice")
    found = await arrows(page)
    receivers = [to for _, to, _, _ in found]
    assert in_order(receivers, ["basket", "ordering", "catalog", "payment", "ordering"]), found
    assert all(outcome == "handled" for *_, outcome in found), found
    assert ["gateway", "basket", "basket.checkout", "handled"] in found
    assert ["payment", "ordering", "PaymentSucceeded", "handled"] in found
    lifelines = await page.eval_on_selector_all(
        "svg.sequence g.lifeline", "els => els.map(e => e.dataset.service)"
    )
    assert {"gateway", "basket", "ordering", "catalog", "payment"} <= set(lifelines)
    await shot(page, shots, "conversation.png")

    # Each message's details one click away: the charge, with alice's order in its body.
    await page.click("svg.sequence g.arrow[data-type='payment.charge'] text")
    await page.wait_for_url("**/message/*")
    details = await page.inner_text("main")
    assert "payment.charge" in details
    assert orders["alice"] in details
    assert "ordering → payment" in details

    # carol's order is over payment's limit: her conversation shows the declined payment.
    def declined(found: list[list[str]]) -> bool:
        return any(kind == "OrderCancelled" for _, _, kind, _ in found)

    found = await conversation(page, base, "checkout-carol", declined)
    assert ["payment", "ordering", "PaymentFailed", "handled"] in found, found
    assert "PaymentFailed" in await page.inner_text("table.steps")

    await page.goto(f"{base}/")
    table = await page.inner_text("table.services")
    for service in ("basket", "catalog", "gateway", "ordering", "payment"):
        assert service in table
    await page.close()


async def _replay(browser: Browser, base: str, transport: str, shots: Path) -> None:
    fast = AuditSettings(flush_interval=0.05)
    ledger = Bus(
        "ledger",
        transport,
        audit=fast,
        heartbeat_interval=0.5,
        telemetry=False,
        retry=RetryPolicy(immediate=0, delays=()),
    )
    till = Bus("till", transport, telemetry=False)
    till.route(Post, to="ledger")
    broken = True
    posted: list[str] = []

    @ledger.handle(Post)
    async def post(command: Post, ctx: Context) -> None:
        if broken:
            raise PermissionError(f"the ledger is closed for {command.entry}")
        posted.append(command.entry)

    services = await browser.new_page(viewport={"width": 1500, "height": 700})
    await services.goto(f"{base}/")
    await services.wait_for_selector("#live.on")  # the event stream is open
    async with running(ledger), till:
        # Live: the new service appears on the open page at its first heartbeat, no reload.
        await services.wait_for_selector("tr[data-service='ledger'] .instance.alive", timeout=15_000)
        await shot(services, shots, "services.png")

        failed = await browser.new_page(viewport={"width": 1500, "height": 800})
        # The page's event stream is held until the dashboard has the dead letter: the one event
        # that says so goes out before the page listens (as when a page opens at that moment, or
        # its stream is reconnecting), and the page must catch up when its stream opens.
        held = asyncio.Event()

        async def hold(route: Route) -> None:
            await held.wait()
            await route.continue_()

        await failed.route("**/events", hold)
        await failed.goto(f"{base}/failed")
        assert "ledger" not in await failed.inner_text("#failed")
        await till.send(Post(entry="entry-1"), correlation_id="ledger-entry-1")
        # The record is stored, so its "failed" event has gone to the pages listening then.
        await _dashboard_has(base, "/fragment/conversation?id=ledger-entry-1", 'data-outcome="dead-lettered"')
        assert 'data-service="ledger"' in await _dashboard_get(base, "/fragment/failed")
        held.set()
        # The dead letter appears on the open failed-messages page by itself.
        await failed.wait_for_selector("section.group[data-service='ledger'] tr", timeout=15_000)
        assert "builtins.PermissionError" in await failed.inner_text("section.group[data-service='ledger']")
        await shot(failed, shots, "failed.png")

        watch = await browser.new_page(viewport={"width": 1500, "height": 500})
        await watch.goto(f"{base}/conversation?id=ledger-entry-1")
        assert await arrows(watch) == [["till", "ledger", "ledger.post", "dead-lettered"]]

        broken = False  # the bug is fixed: replay it from the page, after the confirmation
        await failed.click("section.group[data-service='ledger'] tr a.button")
        await failed.wait_for_url("**/confirm?*")
        assert "back on the queue of ledger" in await failed.inner_text("p.question")
        await shot(failed, shots, "confirm.png")
        await failed.click("#confirm")
        await failed.wait_for_url("**/failed?done=*")
        assert "replayed 1 message onto ledger" in await failed.inner_text("p.done")

        # The open conversation page turns the arrow to handled, without a reload.
        await watch.wait_for_selector("svg.sequence g.arrow[data-outcome='handled']", timeout=15_000)
        assert posted == ["entry-1"]
        await shot(watch, shots, "replayed.png")


async def _dashboard_get(base: str, path: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.get(path)
        response.raise_for_status()
        return response.text


async def _dashboard_has(base: str, path: str, text: str) -> None:
    """Wait until the dashboard serves `text` at `path` (it has ingested what shows it)."""
    for _ in range(150):
        if text in await _dashboard_get(base, path):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never showed {text!r}")
