"""ordering: owns orders, and runs each one through its steps as a saga (`OrderProcess`).

    PlaceOrder             [*]              -> reserving stock   ReserveStock    -> catalog
    StockReserved          reserving stock  -> charging payment  ChargePayment   -> payment,
                                                                 PaymentTimedOut -> itself, later
    StockReservationFailed reserving stock  -> cancelled         OrderCancelled  => *
    PaymentSucceeded       charging payment -> confirmed         OrderConfirmed  => *
    PaymentFailed          charging payment -> cancelled         OrderCancelled  => * (compensation:
    PaymentTimedOut        charging payment -> cancelled           catalog gives the held stock back)

The saga's state (the order's buyer and total) lives in `tidings_sagas`; each step also updates the
`orders` row, the order as the gateway reads it (`GetOrder`), in the same transaction. News that
comes late, twice under another id, or for an order already settled changes nothing: the saga takes
each message only in the state its step names (`during=`), and not at all once it completed.
`tidings saga diagram examples.eshop.ordering:OrderProcess` draws it (docs/sagas.md).

    python -m examples.eshop.ordering --transport sqlite:///bus.db --db ordering.db --payment-timeout 30
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.eshop import messages as m
from examples.eshop.service import (
    Money,
    Names,
    create_schema,
    emit,
    open_database,
    parse_options,
    serve_with_database,
    service_bus,
    start_tracing,
)
from tidings import Bus, Context, Saga, SagaContext, Transition, handles, starts, timeout

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("buyer", String(64), nullable=False),
    #: pending, confirmed or cancelled.
    Column("status", String(16), nullable=False),
    #: While pending: what the order waits for (the saga's state: "reserving stock", ...).
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
#: How long an order waits for payment's answer before it is cancelled (`--payment-timeout`).
PAYMENT_TIMEOUT = timedelta(seconds=30)


class OrderState(BaseModel):
    order_id: str
    buyer: str
    total: Decimal


class OrderProcess(Saga[OrderState], name="ordering.order-process", final=("confirmed", "cancelled")):
    """One order, from `PlaceOrder` to confirmed or cancelled."""

    #: Set by `build()` from its argument (a saga class has no constructor of its own to take it).
    payment_timeout: ClassVar[timedelta] = PAYMENT_TIMEOUT

    @starts(m.PlaceOrder, by="order_id", to=RESERVING)
    async def placed(self, command: m.PlaceOrder, ctx: SagaContext) -> None:
        total = sum((line.unit_price * line.quantity for line in command.lines), start=Decimal(0))
        self.state = OrderState(order_id=command.order_id, buyer=command.buyer, total=total)
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

    @handles(m.StockReserved, by="order_id", during=RESERVING, to=CHARGING)
    async def reserved(self, event: m.StockReserved, ctx: SagaContext) -> None:
        await self._show(ctx, status="pending", step=CHARGING)
        state = self.state
        await ctx.send(m.ChargePayment(order_id=state.order_id, buyer=state.buyer, amount=state.total))
        await ctx.timeout(m.PaymentTimedOut(), after=self.payment_timeout)

    @handles(m.StockReservationFailed, by="order_id", during=RESERVING, to="cancelled")
    async def not_reserved(self, event: m.StockReservationFailed, ctx: SagaContext) -> None:
        await self._cancel(ctx, event.reason)  # nothing was taken, nothing to give back

    @handles(m.PaymentSucceeded, by="order_id", during=CHARGING, to="confirmed")
    async def paid(self, event: m.PaymentSucceeded, ctx: SagaContext) -> None:
        await self._show(ctx, status="confirmed", step=None)
        await ctx.publish(m.OrderConfirmed(order_id=self.state.order_id))

    @handles(m.PaymentFailed, by="order_id", during=CHARGING, to="cancelled")
    async def not_paid(self, event: m.PaymentFailed, ctx: SagaContext) -> None:
        await self._cancel(ctx, event.reason)

    @timeout(m.PaymentTimedOut, during=CHARGING, to="cancelled")
    async def payment_timed_out(self, message: m.PaymentTimedOut, ctx: SagaContext) -> None:
        seconds = round(self.payment_timeout.total_seconds())
        await self._cancel(ctx, f"no answer from payment within {seconds} s")

    async def _cancel(self, ctx: SagaContext, reason: str) -> None:
        """Compensation is ordinary code: cancel the order and say so; catalog, hearing
        `OrderCancelled`, gives back the stock it holds for it."""
        await self._show(ctx, status="cancelled", step=None, reason=reason)
        await ctx.publish(m.OrderCancelled(order_id=self.state.order_id, reason=reason))

    async def _show(self, ctx: SagaContext, **values: object) -> None:
        """Update the order as the gateway reads it, in the step's transaction."""
        await ctx.session.execute(update(orders).where(orders.c.order_id == self.key).values(**values))


def build(
    names: Names, transport: str, engine: AsyncEngine, *, payment_timeout: timedelta = PAYMENT_TIMEOUT
) -> Bus:
    """The ordering bus with its saga and its read handler (not started)."""
    bus = service_bus(names.ordering, transport, engine)
    bus.declare_publishes(m.OrderConfirmed, m.OrderCancelled)
    bus.route(m.ReserveStock, to=names.catalog)
    bus.route(m.ChargePayment, to=names.payment)
    OrderProcess.payment_timeout = payment_timeout
    bus.saga(OrderProcess)
    assert bus.sagas is not None
    bus.sagas.on_transition(lambda transition: _trace(bus.service, transition))

    @bus.handle(m.GetOrder)
    async def get_order(request: m.GetOrder, ctx: Context) -> m.OrderView:
        row = (await ctx.session.execute(select(orders).where(orders.c.order_id == request.order_id))).first()
        if row is None:
            return m.OrderView(order_id=request.order_id, status=None)
        return m.OrderView.model_validate(row, from_attributes=True)

    return bus


def _trace(service: str, transition: Transition) -> None:
    """One `saga` line per saved step, for the demo's trace (`report.py` prints it)."""
    emit(
        "saga",
        service=service,
        saga=transition.saga,
        key=transition.key,
        message=transition.message_type,
        before=transition.before,
        after=transition.after,
        completed=transition.completed,
    )


async def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument(
        "--payment-timeout",
        type=float,
        default=PAYMENT_TIMEOUT.total_seconds(),
        help="seconds an order waits for payment before it is cancelled",
    )
    options = parse_options(__doc__ or "ordering", database="ordering.db", extra=own)
    start_tracing(options, options.names.ordering)
    assert options.database is not None  # it has a --db option, with a default
    engine = open_database(options.database)
    await create_schema(engine, metadata)
    timeout_after = timedelta(seconds=options.extra["payment_timeout"])
    bus = build(options.names, options.transport, engine, payment_timeout=timeout_after)
    await serve_with_database(bus, engine, stats=options.stats)


if __name__ == "__main__":
    asyncio.run(main())
