"""basket: owns the buyers' baskets until checkout.

Handles requests from the gateway (add an item, show a basket, check out) and hears
`ProductPriceChanged` from catalog: every basket holding the product gets the new price and a
notice telling the buyer. Checkout empties the basket and sends `PlaceOrder` to ordering in one
transaction (the outbox): there is never an emptied basket without an order on its way, nor an
order for a basket still full.

    python -m examples.eshop.basket --transport sqlite:///bus.db --db basket.db
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

from sqlalchemy import Column, Integer, MetaData, String, Table, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from examples.eshop import messages as m
from examples.eshop.service import (
    Money,
    Names,
    create_schema,
    open_database,
    parse_options,
    serve_with_database,
    service_bus,
    start_tracing,
)
from tidings import Bus, Context

metadata = MetaData()

basket_lines = Table(
    "basket_lines",
    metadata,
    Column("buyer", String(64), primary_key=True),
    Column("product_id", Integer, primary_key=True),
    Column("product_name", String(100), nullable=False),
    Column("unit_price", Money(), nullable=False),
    Column("quantity", Integer, nullable=False),
)

notices = Table(
    "notices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("buyer", String(64), nullable=False),
    Column("text", String(200), nullable=False),
)


async def lines_of(session: AsyncSession, buyer: str) -> list[m.Line]:
    rows = await session.execute(
        select(basket_lines).where(basket_lines.c.buyer == buyer).order_by(basket_lines.c.product_id)
    )
    return [m.Line.model_validate(row, from_attributes=True) for row in rows]


async def _view(session: AsyncSession, buyer: str) -> m.BasketView:
    lines = await lines_of(session, buyer)
    texts: list[str] = list(
        await session.scalars(select(notices.c.text).where(notices.c.buyer == buyer).order_by(notices.c.id))
    )
    return m.BasketView(
        buyer=buyer,
        lines=lines,
        total=sum((line.unit_price * line.quantity for line in lines), start=Decimal(0)),
        notices=texts,
    )


def build(names: Names, transport: str, engine: AsyncEngine) -> Bus:
    """The basket bus with its handlers (not started)."""
    bus = service_bus(names.basket, transport, engine)
    bus.route(m.PlaceOrder, to=names.ordering)

    @bus.handle(m.AddBasketItem)
    async def add_item(command: m.AddBasketItem, ctx: Context) -> m.BasketView:
        key = (basket_lines.c.buyer == command.buyer, basket_lines.c.product_id == command.product_id)
        changed = await ctx.session.execute(
            update(basket_lines)
            .where(*key)
            .values(quantity=basket_lines.c.quantity + command.quantity, unit_price=command.unit_price)
        )
        if changed.rowcount == 0:
            await ctx.session.execute(insert(basket_lines).values(**command.model_dump()))
        return await _view(ctx.session, command.buyer)

    @bus.handle(m.GetBasket)
    async def get_basket(request: m.GetBasket, ctx: Context) -> m.BasketView:
        return await _view(ctx.session, request.buyer)

    @bus.handle(m.CheckoutBasket)
    async def checkout(command: m.CheckoutBasket, ctx: Context) -> m.CheckoutResult:
        lines = await lines_of(ctx.session, command.buyer)
        if not lines:
            return m.CheckoutResult(order_id=None, reason="the basket is empty")
        order_id = f"order-{uuid.uuid4().hex[:12]}"
        await ctx.session.execute(delete(basket_lines).where(basket_lines.c.buyer == command.buyer))
        # The emptied basket and PlaceOrder commit together (outbox); the reply too, after them.
        await ctx.send(m.PlaceOrder(order_id=order_id, buyer=command.buyer, lines=lines))
        return m.CheckoutResult(order_id=order_id)

    @bus.subscribe(m.ProductPriceChanged)
    async def reprice(event: m.ProductPriceChanged, ctx: Context) -> None:
        buyers = list(
            await ctx.session.scalars(
                select(basket_lines.c.buyer).where(basket_lines.c.product_id == event.product_id)
            )
        )
        await ctx.session.execute(
            update(basket_lines)
            .where(basket_lines.c.product_id == event.product_id)
            .values(unit_price=event.new_price)
        )
        # Not idempotent on purpose: run twice, this would tell each buyer twice. The inbox is what
        # keeps a redelivered ProductPriceChanged from doing so.
        text = f"{event.product_name}: price changed from {event.old_price} to {event.new_price}"
        for buyer in buyers:
            await ctx.session.execute(insert(notices).values(buyer=buyer, text=text))

    return bus


async def main() -> None:
    options = parse_options(__doc__ or "basket", database="basket.db")
    start_tracing(options, options.names.basket)
    assert options.database is not None  # it has a --db option, with a default
    engine = open_database(options.database)
    await create_schema(engine, metadata)
    bus = build(options.names, options.transport, engine)
    await serve_with_database(bus, engine, stats=options.stats)


if __name__ == "__main__":
    asyncio.run(main())
