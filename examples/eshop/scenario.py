"""The demo's scenario, driven over HTTP through the gateway, and the final state it must leave.

1. Five buyers fill baskets (the gateway asks catalog for the price, basket keeps it).
2. Tea's price changes in catalog; basket hears `ProductPriceChanged` and reprices the baskets that
   hold tea. The client polls until it sees the new price: eventual consistency, visible.
3. The demo delivers that same `ProductPriceChanged` (same id) to basket a second time, as an
   at-least-once transport may; basket's inbox acknowledges it without running the handler.
4. Five buyers check out. carol's order is over payment's limit: cancelled, stock released. dave
   meets a payment provider that times out once: the bus retries and his order is confirmed.
   frank's provider never answers: ordering's order process (a saga) times out and compensates:
   the order is cancelled and catalog gives the stock back. The client follows each order at its
   URL and prints every status it sees.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from examples.eshop.messages import ProductPriceChanged
from examples.eshop.report import Trace, milliseconds
from tidings import Bus, Context, Envelope

TEA = 1
#: What each buyer puts in the basket: (product id, quantity).
BASKETS: Mapping[str, list[tuple[int, int]]] = {
    "alice": [(1, 2), (2, 1)],
    "bob": [(2, 2)],
    "carol": [(3, 1)],
    "dave": [(1, 3)],
    "erin": [(1, 1)],
    "frank": [(2, 1)],
}
CHECKOUTS = ("alice", "bob", "carol", "dave", "frank")
NEW_TEA_PRICE = Decimal("3.50")
PAYMENT_LIMIT = Decimal(300)
#: The buyer whose first payment attempt fails (payment's `--flaky-buyer`).
FLAKY_BUYER = "dave"
#: The buyer whose payment provider never answers (payment's `--unanswered-buyer`).
UNANSWERED_BUYER = "frank"
#: Seconds ordering's order process waits for payment (ordering's `--payment-timeout`): well past
#: dave's retried charge, and short enough for the demo to wait it out for frank.
PAYMENT_TIMEOUT = 4
#: How long the client waits for something that should happen before calling it a failure.
PATIENCE = 20.0
POLL_INTERVAL = 0.02

NOTICE = "Tea: price changed from 4.00 to 3.50"

#: The state every service's database must end in: services by table, keyed by buyer and product.
EXPECTED: dict[str, dict[str, Any]] = {
    "catalog": {
        "products": {"Tea": ("3.50", 95), "Coffee": ("9.00", 47), "Espresso machine": ("450.00", 5)},
        "reservations": {
            ("alice", "Tea"): (2, "sold"),
            ("alice", "Coffee"): (1, "sold"),
            ("bob", "Coffee"): (2, "sold"),
            ("carol", "Espresso machine"): (1, "released"),
            ("dave", "Tea"): (3, "sold"),
            ("frank", "Coffee"): (1, "released"),
        },
    },
    "basket": {
        "lines": {("erin", "Tea"): (1, "3.50")},
        "notices": {"alice": [NOTICE], "dave": [NOTICE], "erin": [NOTICE]},
    },
    "ordering": {
        "orders": {
            "alice": ("confirmed", "16.00", None),
            "bob": ("confirmed", "18.00", None),
            "carol": ("cancelled", "450.00", "amount 450.00 is over the limit of 300"),
            "dave": ("confirmed", "10.50", None),
            "frank": ("cancelled", "9.00", f"no answer from payment within {PAYMENT_TIMEOUT} s"),
        },
    },
    "payment": {
        "payments": {
            "alice": ("succeeded", "16.00"),
            "bob": ("succeeded", "18.00"),
            "carol": ("declined", "450.00"),
            "dave": ("succeeded", "10.50"),
            "frank": ("pending", "9.00"),
        },
    },
}


@dataclass(slots=True)
class Outcome:
    """What the scenario saw from the client's side."""

    #: The order id of each buyer who checked out.
    orders: dict[str, str] = field(default_factory=dict)
    #: Seconds from each checkout call to the order's final status.
    latencies: dict[str, float] = field(default_factory=dict)
    #: The statuses each order went through, as the client saw them.
    statuses: dict[str, list[str]] = field(default_factory=dict)


class Tap:
    """The demo's own subscriber: it keeps a copy of `ProductPriceChanged` to deliver it again."""

    def __init__(self, name: str, transport: str) -> None:
        self.bus = Bus(name, transport)
        self.captured: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

        @self.bus.subscribe(ProductPriceChanged)
        async def capture(event: ProductPriceChanged, ctx: Context) -> None:
            if not self.captured.done():
                self.captured.set_result(ctx.envelope)

    async def __aenter__(self) -> Tap:
        await self.bus.start()  # bound before the price changes, so it gets its copy
        self._task = asyncio.create_task(self.bus.run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.bus.stop()
        if self._task is not None:
            await self._task
        await self.bus.close()


async def _eventually(what: str, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll the async `check()` until it is true; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > PATIENCE:
            raise TimeoutError(f"{what}: not within {PATIENCE} s")
        await asyncio.sleep(POLL_INTERVAL)
    return time.monotonic() - started


async def run_scenario(client: httpx.AsyncClient, trace: Trace, tap: Tap, basket_queue: str) -> Outcome:
    """Drive the whole scenario through the gateway; raises when a step does not happen."""
    outcome = Outcome()

    async def call(method: str, path: str, correlation_id: str, **kwargs: Any) -> httpx.Response:
        response = await client.request(method, path, headers={"x-correlation-id": correlation_id}, **kwargs)
        if response.status_code >= 500:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response

    trace.heading("1. Buyers fill their baskets (gateway: catalog for the price, basket keeps it)")
    for buyer, lines in BASKETS.items():
        for product_id, quantity in lines:
            response = await call(
                "POST",
                f"/baskets/{buyer}/items",
                f"fill-{buyer}",
                json={"product_id": product_id, "quantity": quantity},
            )
            response.raise_for_status()
        trace.say("client", f"POST /baskets/{buyer}/items -> basket total {response.json()['total']}")

    trace.heading(f"2. Tea's price changes to {NEW_TEA_PRICE} in catalog; basket follows, eventually")
    response = await call("PUT", f"/products/{TEA}/price", "price-tea", json={"price": str(NEW_TEA_PRICE)})
    response.raise_for_status()
    trace.say(
        "client", f"PUT /products/{TEA}/price -> {response.status_code}, was {response.json()['old_price']}"
    )

    async def basket_repriced() -> bool:
        view = (await call("GET", "/baskets/alice", "watch-alice")).json()
        return any(Decimal(line["unit_price"]) == NEW_TEA_PRICE for line in view["lines"])

    waited = await _eventually("alice's basket shows the new price", basket_repriced)
    trace.say("client", f"GET /baskets/alice shows tea at {NEW_TEA_PRICE} after {milliseconds(waited)}")

    trace.heading("3. The same ProductPriceChanged is delivered to basket once more (same message id)")
    envelope = await asyncio.wait_for(tap.captured, PATIENCE)
    await tap.bus.transport.send(envelope, basket_queue)
    trace.say("demo", f"sent {envelope.type} {envelope.id} to {trace.short(basket_queue)} again")

    async def suppressed() -> bool:
        return trace.seen(lambda line: line["id"] == envelope.id and line["outcome"] == "duplicate")

    await _eventually("basket suppresses the duplicate", suppressed)

    trace.heading("4. Five checkouts; the client follows each order until it settles (frank's times out)")
    started: dict[str, float] = {}
    for buyer in CHECKOUTS:
        started[buyer] = time.monotonic()
        response = await call("POST", f"/baskets/{buyer}/checkout", f"checkout-{buyer}")
        response.raise_for_status()
        outcome.orders[buyer] = response.json()["order_id"]
        trace.say(
            "client", f"POST /baskets/{buyer}/checkout -> {response.status_code} {outcome.orders[buyer]}"
        )

    async def follow(buyer: str) -> None:
        seen = outcome.statuses.setdefault(buyer, [])

        async def settled() -> bool:
            response = await call("GET", f"/orders/{outcome.orders[buyer]}", f"watch-{buyer}")
            view = response.json()
            status = "not yet at ordering" if view["status"] is None else view["status"]
            if view.get("step"):
                status += f" ({view['step']})"
            if view.get("reason"):
                status += f": {view['reason']}"
            if not seen or seen[-1] != status:
                seen.append(status)
                trace.say("client", f"order of {buyer:5} {status}")
            return view["status"] in ("confirmed", "cancelled")

        await _eventually(f"{buyer}'s order settles", settled)
        outcome.latencies[buyer] = time.monotonic() - started[buyer]

    await asyncio.gather(*(follow(buyer) for buyer in CHECKOUTS))
    return outcome


# -- the final state -----------------------------------------------------------------------------


def _rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    # Read-only, beside the running service (WAL): the check never takes a write lock.
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return connection.execute(query).fetchall()


def read_state(databases: Mapping[str, Path], orders: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Every service's tables, keyed by buyer and product name like `EXPECTED`."""
    buyer_of = {order_id: buyer for buyer, order_id in orders.items()}
    catalog, basket = databases["catalog"], databases["basket"]
    names = {id_: name for id_, name in _rows(catalog, "SELECT id, name FROM products")}
    return {
        "catalog": {
            "products": {
                name: (price, stock)
                for name, price, stock in _rows(catalog, "SELECT name, price, stock FROM products")
            },
            "reservations": {
                (buyer_of.get(order_id, order_id), names[product_id]): (quantity, status)
                for order_id, product_id, quantity, status in _rows(
                    catalog, "SELECT order_id, product_id, quantity, status FROM reservations"
                )
            },
        },
        "basket": {
            "lines": {
                (buyer, name): (quantity, price)
                for buyer, name, quantity, price in _rows(
                    basket, "SELECT buyer, product_name, quantity, unit_price FROM basket_lines"
                )
            },
            "notices": _group(_rows(basket, "SELECT buyer, text FROM notices ORDER BY id")),
        },
        "ordering": {
            "orders": {
                buyer_of.get(order_id, order_id): (status, total, reason)
                for order_id, status, total, reason in _rows(
                    databases["ordering"], "SELECT order_id, status, total, reason FROM orders"
                )
            },
        },
        "payment": {
            "payments": {
                buyer_of.get(order_id, order_id): (status, amount)
                for order_id, status, amount in _rows(
                    databases["payment"], "SELECT order_id, status, amount FROM payments"
                )
            },
        },
    }


def _group(rows: list[tuple[Any, ...]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for buyer, text in rows:
        out.setdefault(buyer, []).append(text)
    return out


def differences(state: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """How `state` differs from `EXPECTED`, one line per table; empty when it is as expected."""
    problems = []
    for service, tables in EXPECTED.items():
        for table, expected in tables.items():
            actual = state.get(service, {}).get(table)
            if actual != expected:
                problems.append(f"{service}.{table}: expected {expected}, found {actual}")
    return problems


def stats_problems(stats: Mapping[str, Mapping[str, int]]) -> list[str]:
    """What the services' counters must say after the scenario."""
    problems = []

    def expect(service: str, counter: str, value: int) -> None:
        found = stats.get(service, {}).get(counter)
        if found != value:
            problems.append(f"{service} stats: expected {counter} = {value}, found {found}")

    expect("basket", "duplicates", 1)
    expect("payment", "failed_attempts", 1)
    expect("payment", "retries_scheduled", 1)
    for service in ("catalog", "basket", "ordering", "payment"):
        expect(service, "dead_lettered", 0)
    expect("gateway", "late_replies", 0)
    return problems
