"""ordering: owns orders, and runs each one through its steps (a small process manager).

    PlaceOrder          -> order pending, step "reserving stock";  ReserveStock   -> catalog
    StockReserved       -> step "charging payment";                ChargePayment  -> payment
    PaymentSucceeded    -> confirmed;                              OrderConfirmed => *
    PaymentFailed       -> cancelled;                              OrderCancelled => * (catalog
    StockReservationFailed -> cancelled                            gives the stock back)

The order's row is the process's state: each step checks it before acting, so a message that comes
late or for an order already settled changes nothing. The gateway reads orders with `GetOrder`.

    python -m examples.eshop.ordering --transport sqlite:///bus.db --db ordering.db
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Row, String, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

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

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("buyer", String(64), nullable=False),
    #: pending, confirmed or cancelled.
    Column("status", String(16), nullable=False),
    #: While pending: what the order waits for ("reserving stock", "charging payment").
    Column("step", String(32), nullable=True),
    Column("total", Money(), nullable=False),
    Column("reason", String(200), nullable=True),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("product_id", Integer, primary_key=True),
    Column("product_name", String(100), nullable=False),
    Column("unit_price", Money(), nullable=False),
    Column("quantity", Integer, nullable=False),
)

RESERVING = "reserving stock"
CHARGING = "charging payment"


def build(names: Names, transport: str, engine: AsyncEngine) -> Bus:
    """The ordering bus with its handlers (not started)."""
    bus = service_bus(names.ordering, transport, engine)
    bus.declare_publishes(m.OrderConfirmed, m.OrderCancelled)
    bus.route(m.ReserveStock, to=names.catalog)
    bus.route(m.ChargePayment, to=names.payment)

    async def advance(ctx: Context, order_id: str, *, waiting_for: str, **values: object) -> Row[Any] | None:
        """Move on a pending order waiting at step `waiting_for`: its new row, or None if it is not
        waiting there (the news came late, or twice under two message ids)."""
        changed = await ctx.session.execute(
            update(orders)
            .where(orders.c.order_id == order_id, orders.c.status == "pending", orders.c.step == waiting_for)
            .values(**values)
            .returning(orders)
        )
        row: Row[Any] | None = changed.first()
        return row

    async def cancel(ctx: Context, order_id: str, *, waiting_for: str, reason: str) -> None:
        if await advance(
            ctx, order_id, waiting_for=waiting_for, status="cancelled", step=None, reason=reason
        ):
            await ctx.publish(m.OrderCancelled(order_id=order_id, reason=reason))

    @bus.handle(m.PlaceOrder)
    async def place(command: m.PlaceOrder, ctx: Context) -> None:
        total = sum((line.unit_price * line.quantity for line in command.lines), start=Decimal(0))
        await ctx.session.execute(
            insert(orders).values(
                order_id=command.order_id, buyer=command.buyer, status="pending", step=RESERVING, total=total
            )
        )
        await ctx.session.execute(
            insert(order_lines),
            [{"order_id": command.order_id, **line.model_dump()} for line in command.lines],
        )
        await ctx.send(m.ReserveStock(order_id=command.order_id, lines=command.lines))

    @bus.handle(m.GetOrder)
    async def get_order(request: m.GetOrder, ctx: Context) -> m.OrderView:
        row = (await ctx.session.execute(select(orders).where(orders.c.order_id == request.order_id))).first()
        if row is None:
            return m.OrderView(order_id=request.order_id, status=None)
        return m.OrderView.model_validate(row, from_attributes=True)

    @bus.subscribe(m.StockReserved)
    async def on_reserved(event: m.StockReserved, ctx: Context) -> None:
        order = await advance(ctx, event.order_id, waiting_for=RESERVING, step=CHARGING)
        if order is not None:
            await ctx.send(m.ChargePayment(order_id=order.order_id, buyer=order.buyer, amount=order.total))

    @bus.subscribe(m.StockReservationFailed)
    async def on_not_reserved(event: m.StockReservationFailed, ctx: Context) -> None:
        await cancel(ctx, event.order_id, waiting_for=RESERVING, reason=event.reason)

    @bus.subscribe(m.PaymentSucceeded)
    async def on_paid(event: m.PaymentSucceeded, ctx: Context) -> None:
        if await advance(ctx, event.order_id, waiting_for=CHARGING, status="confirmed", step=None):
            await ctx.publish(m.OrderConfirmed(order_id=event.order_id))

    @bus.subscribe(m.PaymentFailed)
    async def on_not_paid(event: m.PaymentFailed, ctx: Context) -> None:
        await cancel(ctx, event.order_id, waiting_for=CHARGING, reason=event.reason)

    return bus


async def main() -> None:
    options = parse_options(__doc__ or "ordering", database="ordering.db")
    start_tracing(options, options.names.ordering)
    assert options.database is not None  # it has a --db option, with a default
    engine = open_database(options.database)
    await create_schema(engine, metadata)
    bus = build(options.names, options.transport, engine)
    await serve_with_database(bus, engine, stats=options.stats)


if __name__ == "__main__":
    asyncio.run(main())
