"""`tidings dashboard` as a process over real buses with audit on (SQLite transport): the pages
show the services by their heartbeats, the failed messages from the error queues, replay through
the dead-letters code, live events; replay and purge need the same origin, and a token beyond
loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import system_url
from tests.dashboard.server import dashboard
from tests.helpers import running
from tidings import Bus, Command, Context, Envelope, RetryPolicy
from tidings.audit import AuditSettings
from tidings.dashboard.depth import queue_depths
from tidings.transports import transport_from_url

FAST = AuditSettings(flush_interval=0.05)


class Charge(Command, name="dash-test.charge"):
    order_id: str


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


async def test_services_failed_messages_replay_and_live_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    payment = Bus(
        "payment",
        url,
        audit=FAST,
        heartbeat_interval=0.3,
        telemetry=False,
        retry=RetryPolicy(immediate=0, delays=()),
    )
    shop = Bus("shop", url, audit=FAST, heartbeat_interval=0.3, telemetry=False)
    shop.route(Charge, to="payment")
    broken = True
    handled: list[str] = []

    @payment.handle(Charge)
    async def charge(command: Charge, ctx: Context) -> None:
        if broken:
            raise ConnectionError(f"the provider is down for {command.order_id}")
        handled.append(command.order_id)

    with dashboard(url, tmp_path / "dashboard.db") as server:
        async with running(payment, shop), httpx.AsyncClient(base_url=server.url, timeout=10) as client:

            async def page(path: str) -> str:
                response = await client.get(path)
                response.raise_for_status()
                return response.text

            async def both_alive() -> bool:
                text = await page("/fragment/services")
                return 'data-service="payment"' in text and text.count('data-state="alive"') == 2

            await until("both instances alive on the services page", both_alive)

            async with client.stream("GET", "/events") as events:
                lines = events.aiter_lines()
                await shop.send(Charge(order_id="order-1"), correlation_id="checkout-1")
                async with asyncio.timeout(10):  # a live event, without a reload
                    while (await anext(lines)) != "event: message":
                        pass

            async def failed_listed() -> bool:
                return "dash-test.charge" in await page("/fragment/failed")

            await until("the dead letter on the failed messages page", failed_listed)
            failed = await page("/failed")
            assert "builtins.ConnectionError" in failed
            assert "the provider is down for order-1" in failed
            (dead,) = await payment.transport.dead_letters("payment")
            details = await page(f"/failed/message?service=payment&id={dead.message_id}")
            assert '"order_id": "order-1"' in details.replace("&#34;", '"')  # the body
            assert "checkout-1" in details
            assert "Traceback" in details

            # The confirmation page only asks: nothing moves until its form is posted.
            confirm = await page(f"/confirm?action=replay-one&service=payment&id={dead.message_id}")
            assert "back on the queue of <strong>payment</strong>" in confirm
            await asyncio.sleep(0.3)
            assert len(await payment.transport.dead_letters("payment")) == 1
            form = {"action": "replay-one", "service": "payment", "id": dead.message_id}
            # Another site's page in the same browser may not post here.
            refused = await client.post("/act", data=form, headers={"Origin": "http://evil.example"})
            assert refused.status_code == 403
            assert len(await payment.transport.dead_letters("payment")) == 1

            broken = False
            done = await client.post("/act", data=form, headers={"Origin": server.url})
            assert done.status_code == 303
            assert "replayed+1+message" in done.headers["location"]

            async def handled_after_replay() -> bool:
                return "handled" in await page("/fragment/conversation?id=checkout-1") and handled == [
                    "order-1"
                ]

            await until("the replayed message handled, in its conversation", handled_after_replay)
            diagram = await page("/conversation?id=checkout-1")
            assert 'data-outcome="handled"' in diagram
            assert "shop → payment" in diagram
            assert await payment.transport.dead_letters("payment") == []

        async def stopped() -> bool:  # the buses' last heartbeats said they stopped
            return (await client_get(server.url, "/fragment/services")).count('data-state="stopped"') == 2

        await until("both instances stopped", stopped)


async def client_get(base: str, path: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.get(path)
        response.raise_for_status()
        return response.text


async def test_beyond_loopback_replay_and_purge_need_the_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    with dashboard(url, tmp_path / "dashboard.db", "--host", "0.0.0.0") as server:
        token = server.line.rsplit("token ", 1)[-1].strip()
        assert "replay and purge need the token" in server.line
        assert len(token) >= 20
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert 'name="token"' in (await client.get("/confirm?action=purge")).text
            refused = await client.post("/act", data={"action": "purge", "token": "wrong"})
            assert refused.status_code == 403
            assert "token" in refused.text
            done = await client.post("/act", data={"action": "purge", "token": token})
            assert done.status_code == 303
            assert "purged+0" in done.headers["location"]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_queue_depths_are_read_from_the_transport(kind: str, tmp_path: Path) -> None:
    async with transport_from_url(system_url(kind, tmp_path)) as transport:
        await transport.declare_queue("waiting")
        await transport.declare_queue("empty")
        for n in range(3):
            await transport.send(Envelope(type="t", source="s", body=b"{}", id=f"m{n}"), "waiting")
        assert await queue_depths(transport, ["waiting", "empty"]) == {"waiting": 3, "empty": 0}
    async with transport_from_url(f"memory://{tmp_path.name}") as memory:  # no way to ask: unknown
        assert await queue_depths(memory, ["waiting"]) == {"waiting": None}
