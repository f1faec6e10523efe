"""The gateway's HTTP edges and the out-of-stock path, with every service in this process.

The services and the gateway run on the in-memory transport with their SQLite databases in a
temporary folder; the HTTP client calls the Starlette app directly (no server, no port), its lifespan
entered as a server enters it, so the gateway runs its bus as in production (`bus.running()`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.eshop import basket, catalog, gateway, ordering, payment
from examples.eshop.service import Names, create_schema, open_database
from tests.helpers import running


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[dict[str, AsyncEngine]]:
    engines = {
        name: open_database(tmp_path / f"{name}.db") for name in ("catalog", "basket", "ordering", "payment")
    }
    await catalog.seed(engines["catalog"])
    await create_schema(engines["basket"], basket.metadata)
    await create_schema(engines["ordering"], ordering.metadata)
    await create_schema(engines["payment"], payment.metadata)
    yield engines
    for engine in engines.values():
        await engine.dispose()


@pytest.fixture
async def client(engines: dict[str, AsyncEngine]) -> AsyncIterator[httpx.AsyncClient]:
    transport, names = f"memory://eshop-{uuid.uuid4().hex}", Names()
    buses = [
        catalog.build(names, transport, engines["catalog"]),
        basket.build(names, transport, engines["basket"]),
        ordering.build(names, transport, engines["ordering"]),
        payment.build(names, transport, engines["payment"], limit=Decimal(300), flaky=frozenset()),
    ]
    for bus in buses:
        await bus.create_tables()
    app = gateway.make_app(gateway.make_bus(names, transport))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://eshop")
    # The gateway's bus lives in the app's lifespan, entered here as a server would.
    async with running(*buses), app.router.lifespan_context(app), client:
        yield client


async def test_bad_requests_get_4xx_answers(client: httpx.AsyncClient) -> None:
    assert (await client.put("/products/99/price", json={"price": "1.00"})).status_code == 404
    assert (await client.put("/products/1/price", json={"price": "cheap"})).status_code == 422
    assert (await client.put("/products/1/price", json={"price": "-1"})).status_code == 422
    assert (await client.post("/baskets/ann/items", json={"product_id": 99})).status_code == 404
    assert (await client.post("/baskets/ann/items", json={"product_id": 1, "quantity": 0})).status_code == 422
    empty = await client.post("/baskets/ann/checkout")
    assert (empty.status_code, empty.json()) == (409, {"detail": "the basket is empty"})
    unknown = await client.get("/orders/order-nope")
    assert unknown.status_code == 404
    assert unknown.json()["status"] is None


async def test_the_correlation_id_of_a_call_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/products", headers={"x-correlation-id": "trace-me"})
    assert response.status_code == 200
    assert response.headers["x-correlation-id"] == "trace-me"
    assert [product["name"] for product in response.json()["products"]] == [
        "Tea",
        "Coffee",
        "Espresso machine",
    ]


async def test_adding_twice_adds_up_at_the_latest_price(client: httpx.AsyncClient) -> None:
    await client.post("/baskets/ann/items", json={"product_id": 2, "quantity": 1})
    await client.put("/products/2/price", json={"price": "8.00"})
    view = (await client.post("/baskets/ann/items", json={"product_id": 2, "quantity": 2})).json()
    assert [(line["quantity"], line["unit_price"]) for line in view["lines"]] == [(3, "8.00")]
    assert view["total"] == "24.00"


async def test_an_order_over_the_stock_is_cancelled_and_takes_nothing(
    client: httpx.AsyncClient, engines: dict[str, AsyncEngine]
) -> None:
    await client.post("/baskets/ann/items", json={"product_id": 3, "quantity": 6})
    checkout = await client.post("/baskets/ann/checkout")
    assert checkout.status_code == 202
    status_url = checkout.json()["status_url"]

    for _ in range(500):
        view = (await client.get(status_url)).json()
        if view["status"] == "cancelled":
            break
        await asyncio.sleep(0.01)
    assert view["status"] == "cancelled"
    assert view["reason"] == "only 5 of Espresso machine in stock, 6 wanted"

    async with engines["catalog"].connect() as connection:
        stock = await connection.scalar(select(catalog.products.c.stock).where(catalog.products.c.id == 3))
        reserved = (await connection.execute(select(catalog.reservations))).all()
    async with engines["payment"].connect() as connection:
        charged = (await connection.execute(select(payment.payments))).all()
    assert (stock, reserved, charged) == (5, [], [])
