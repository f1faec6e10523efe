"""catalog: owns products, their prices and their stock.

Handles requests from the gateway (read a product, list them, change a price) and `ReserveStock`
from ordering; hears `OrderConfirmed` and `OrderCancelled` to settle or release a reservation.
Every handler runs in the service's database transaction (`ctx.session`), and what it publishes
goes through the outbox in that same transaction: a price change and its `ProductPriceChanged`
commit together or not at all.

    python -m examples.eshop.catalog --transport sqlite:///bus.db --db catalog.db
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
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

products = Table(
    "products",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("price", Money(), nullable=False),
    Column("stock", Integer, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("product_id", Integer, ForeignKey("products.id"), primary_key=True),
    Column("quantity", Integer, nullable=False),
    #: held (stock taken out), sold (the order was confirmed) or released (stock given back).
    Column("status", String(16), nullable=False),
)

#: What a new catalog starts with.
SEED = (
    m.Product(id=1, name="Tea", price=Decimal("4.00"), stock=100),
    m.Product(id=2, name="Coffee", price=Decimal("9.00"), stock=50),
    m.Product(id=3, name="Espresso machine", price=Decimal("450.00"), stock=5),
)


def _product(row: object) -> m.Product:
    return m.Product.model_validate(row, from_attributes=True)


async def seed(engine: AsyncEngine) -> None:
    """Create the tables and, in an empty catalog, the starting products."""
    await create_schema(engine, metadata)
    async with engine.begin() as connection:
        if (await connection.scalar(select(func.count()).select_from(products))) == 0:
            await connection.execute(insert(products), [p.model_dump() for p in SEED])


async def _reserve(session: AsyncSession, order_id: str, lines: Sequence[m.Line]) -> str | None:
    """Take stock out for every line, or for none: the reason when one line cannot be served."""
    for line in lines:
        stock = await session.scalar(select(products.c.stock).where(products.c.id == line.product_id))
        if stock is None:
            return f"product {line.product_id} does not exist"
        if stock < line.quantity:
            return f"only {stock} of {line.product_name} in stock, {line.quantity} wanted"
    for line in lines:
        await session.execute(
            update(products)
            .where(products.c.id == line.product_id)
            .values(stock=products.c.stock - line.quantity)
        )
        await session.execute(
            insert(reservations).values(
                order_id=order_id, product_id=line.product_id, quantity=line.quantity, status="held"
            )
        )
    return None


def build(names: Names, transport: str, engine: AsyncEngine) -> Bus:
    """The catalog bus with its handlers (not started)."""
    bus = service_bus(names.catalog, transport, engine)
    bus.declare_publishes(m.ProductPriceChanged, m.StockReserved, m.StockReservationFailed)

    @bus.handle(m.GetProduct)
    async def get_product(request: m.GetProduct, ctx: Context) -> m.ProductDetails:
        row = (await ctx.session.execute(select(products).where(products.c.id == request.product_id))).first()
        return m.ProductDetails(product=_product(row) if row else None)

    @bus.handle(m.ListProducts)
    async def list_products(request: m.ListProducts, ctx: Context) -> m.ProductList:
        rows = (await ctx.session.execute(select(products).order_by(products.c.id))).all()
        return m.ProductList(products=[_product(row) for row in rows])

    @bus.handle(m.ChangeProductPrice)
    async def change_price(command: m.ChangeProductPrice, ctx: Context) -> m.PriceChangeResult:
        row = (await ctx.session.execute(select(products).where(products.c.id == command.product_id))).first()
        if row is None:
            return m.PriceChangeResult(product=None)
        old = _product(row)
        if old.price == command.new_price:
            return m.PriceChangeResult(product=old, old_price=old.price)
        await ctx.session.execute(
            update(products).where(products.c.id == command.product_id).values(price=command.new_price)
        )
        # Through the outbox, in this transaction: the new price and the event announcing it commit
        # together, and the event is shipped only once they have.
        await ctx.publish(
            m.ProductPriceChanged(
                product_id=old.id, product_name=old.name, old_price=old.price, new_price=command.new_price
            )
        )
        return m.PriceChangeResult(
            product=old.model_copy(update={"price": command.new_price}), old_price=old.price
        )

    @bus.handle(m.ReserveStock)
    async def reserve_stock(command: m.ReserveStock, ctx: Context) -> None:
        problem = await _reserve(ctx.session, command.order_id, command.lines)
        if problem is None:
            await ctx.publish(m.StockReserved(order_id=command.order_id))
        else:
            await ctx.publish(m.StockReservationFailed(order_id=command.order_id, reason=problem))

    @bus.subscribe(m.OrderConfirmed)
    async def on_confirmed(event: m.OrderConfirmed, ctx: Context) -> None:
        await ctx.session.execute(
            update(reservations)
            .where(reservations.c.order_id == event.order_id, reservations.c.status == "held")
            .values(status="sold")
        )

    @bus.subscribe(m.OrderCancelled)
    async def on_cancelled(event: m.OrderCancelled, ctx: Context) -> None:
        held = (
            await ctx.session.execute(
                select(reservations).where(
                    reservations.c.order_id == event.order_id, reservations.c.status == "held"
                )
            )
        ).all()
        for row in held:
            await ctx.session.execute(
                update(products)
                .where(products.c.id == row.product_id)
                .values(stock=products.c.stock + row.quantity)
            )
        await ctx.session.execute(
            update(reservations)
            .where(reservations.c.order_id == event.order_id, reservations.c.status == "held")
            .values(status="released")
        )

    return bus


async def main() -> None:
    options = parse_options(__doc__ or "catalog", database="catalog.db")
    start_tracing(options, options.names.catalog)
    assert options.database is not None  # it has a --db option, with a default
    engine = open_database(options.database)
    await seed(engine)
    bus = build(options.names, options.transport, engine)
    await serve_with_database(bus, engine, stats=options.stats)


if __name__ == "__main__":
    asyncio.run(main())
