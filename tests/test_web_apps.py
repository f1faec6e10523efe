"""A FastAPI app, as docs/web-apps.md writes it: `bus.running()` in its lifespan, and a request's
transaction as a dependency, so that a POST's row and its event commit together or not at all.

The app runs in-process (httpx's ASGITransport, the lifespan entered as a server would), on a real
database (a SQLite file, or PostgreSQL in a schema of its own) and the SQLite transport; a second
service consumes the events, so what reaches it is what was shipped from the outbox.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations, and the
# dependency alias is local to the function that builds the app.

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tests.conftest import POSTGRES_HOST, require_server
from tests.helpers import eventually
from tests.storage.databases import POSTGRES_URL, postgres_engine, sqlite_engine
from tidings import Bus, Context, Event
from tidings.storage import outbox_table


class OrderPlaced(Event):
    order_id: str


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "web_orders"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    buyer: Mapped[str] = mapped_column(String(40))


class NewOrder(BaseModel):
    order_id: str
    buyer: str
    #: What goes wrong after the row and the event are written: nothing, a refusal, a crash.
    then: str = "commit"


def make_app(bus: Bus, engine: AsyncEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with bus.running():
            yield

    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def transaction() -> AsyncIterator[AsyncSession]:
        async with sessions() as session, session.begin():
            yield session

    Transaction = Annotated[AsyncSession, Depends(transaction, scope="function")]

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(order: NewOrder, session: Transaction) -> dict[str, str]:
        await bus.publish(OrderPlaced(order_id=order.order_id), session=session)
        # Flushed at the commit, after this function: a duplicate id fails there.
        session.add(Order(id=order.order_id, buyer=order.buyer))
        if order.then == "refuse":
            raise HTTPException(status_code=409, detail="refused after writing")
        if order.then == "crash":
            raise RuntimeError("the endpoint failed after writing")
        return {"order_id": order.order_id}

    return app


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The app's database: a SQLite file, or PostgreSQL seen through a fresh schema."""
    if request.param == "sqlite":
        engine = sqlite_engine(tmp_path / "orders.db")
        yield engine
        await engine.dispose()
        return
    require_server("PostgreSQL", POSTGRES_HOST)
    schema = f"web_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, pool_size=1)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = postgres_engine(schema)
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def committed(engine: AsyncEngine) -> tuple[list[str], list[str]]:
    """The orders in the database, and the orders of the events in its outbox."""
    async with engine.connect() as connection:
        orders = (await connection.execute(select(Order.id).order_by(Order.id))).scalars().all()
        rows = await connection.execute(select(outbox_table.c.body).order_by(outbox_table.c.id))
        bodies: list[bytes] = list(rows.scalars())
    events = [json.loads(body)["order_id"] for body in bodies]
    return list(orders), events


async def test_a_post_commits_its_row_and_its_event_together_or_neither(
    database: AsyncEngine, tmp_path: Path
) -> None:
    transport = f"sqlite:///{tmp_path / 'bus.db'}"
    shop = Bus("shop", transport, database=database)
    shipping = Bus("shipping", transport)
    shipped: list[str] = []

    @shipping.subscribe(OrderPlaced)
    async def ship(event: OrderPlaced, ctx: Context) -> None:
        shipped.append(event.order_id)

    await shop.create_tables()
    async with database.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    app = make_app(shop, database)
    # raise_app_exceptions=False: a crash is answered 500, as a server answers it.
    client_transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        shipping.running(),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=client_transport, base_url="http://shop") as client,
    ):
        placed = await client.post("/orders", json={"order_id": "o-1", "buyer": "ada"})
        assert placed.status_code == 201
        # Committed before the answer: both are there as soon as the client has it.
        assert await committed(database) == (["o-1"], ["o-1"])
        await eventually(lambda: shipped == ["o-1"])

        refused = await client.post("/orders", json={"order_id": "o-2", "buyer": "bob", "then": "refuse"})
        assert refused.status_code == 409
        crashed = await client.post("/orders", json={"order_id": "o-3", "buyer": "cy", "then": "crash"})
        assert crashed.status_code == 500
        # The commit itself fails (the order id is taken): never a 201 for what was not committed.
        duplicate = await client.post("/orders", json={"order_id": "o-1", "buyer": "dee"})
        assert duplicate.status_code == 500
        assert await committed(database) == (["o-1"], ["o-1"])

        # The next order is shipped after o-1, with nothing of the failed requests in between.
        assert (await client.post("/orders", json={"order_id": "o-4", "buyer": "eve"})).status_code == 201
        await eventually(lambda: len(shipped) == 2)
    assert shipped == ["o-1", "o-4"]
    assert await committed(database) == (["o-1", "o-4"], ["o-1", "o-4"])
