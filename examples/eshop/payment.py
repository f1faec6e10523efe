"""payment: charges buyers for their orders, up to a limit per charge.

Handles `ChargePayment` from ordering and publishes `PaymentSucceeded` or `PaymentFailed`. A charge
over `--limit` is declined (a business outcome, not an error: nothing is retried). A buyer named
with `--flaky-buyer` meets a payment provider that times out on the first try: the handler raises,
the bus retries the message later, and the second try succeeds. A buyer named with
`--unanswered-buyer` meets a provider that takes the charge and never calls back: the payment stays
pending and nothing is published, so ordering's order process times out and cancels the order.

    python -m examples.eshop.payment --transport sqlite:///bus.db --db payment.db --limit 300
"""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal

from sqlalchemy import Column, MetaData, String, Table, insert
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
from tidings import Bus, Context, RetryPolicy

metadata = MetaData()

payments = Table(
    "payments",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("buyer", String(64), nullable=False),
    Column("amount", Money(), nullable=False),
    #: succeeded or declined.
    Column("status", String(16), nullable=False),
    Column("reason", String(200), nullable=True),
)

#: A payment provider is worth a moment's patience, not a burst of immediate retries: no
#: immediate retry, then a short delayed one (the message waits in the queue, blocking nothing).
RETRY = RetryPolicy(immediate=0, delays=(0.5, 2.0, 5.0))


class ProviderTimeout(Exception):
    """The (simulated) payment provider did not answer in time."""


def build(
    names: Names,
    transport: str,
    engine: AsyncEngine,
    *,
    limit: Decimal,
    flaky: frozenset[str],
    unanswered: frozenset[str] = frozenset(),
) -> Bus:
    """The payment bus with its handler (not started)."""
    bus = service_bus(names.payment, transport, engine, retry=RETRY)
    bus.declare_publishes(m.PaymentSucceeded, m.PaymentFailed)

    @bus.handle(m.ChargePayment)
    async def charge(command: m.ChargePayment, ctx: Context) -> None:
        if command.buyer in flaky and ctx.attempt == 1:
            raise ProviderTimeout(f"no answer from the provider for order {command.order_id}")
        if command.buyer in unanswered:
            await ctx.session.execute(
                insert(payments).values(
                    order_id=command.order_id, buyer=command.buyer, amount=command.amount, status="pending"
                )
            )
            return  # the provider never calls back: no PaymentSucceeded, no PaymentFailed
        if command.amount > limit:
            reason = f"amount {command.amount} is over the limit of {limit}"
            await ctx.session.execute(
                insert(payments).values(
                    order_id=command.order_id,
                    buyer=command.buyer,
                    amount=command.amount,
                    status="declined",
                    reason=reason,
                )
            )
            await ctx.publish(m.PaymentFailed(order_id=command.order_id, reason=reason))
            return
        await ctx.session.execute(
            insert(payments).values(
                order_id=command.order_id, buyer=command.buyer, amount=command.amount, status="succeeded"
            )
        )
        await ctx.publish(m.PaymentSucceeded(order_id=command.order_id, amount=command.amount))

    return bus


async def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--limit", type=Decimal, default=Decimal(300), help="the largest charge accepted")
    own.add_argument(
        "--flaky-buyer", action="append", default=[], help="the first charge of this buyer fails (repeatable)"
    )
    own.add_argument(
        "--unanswered-buyer",
        action="append",
        default=[],
        help="the provider never answers this buyer's charges (repeatable)",
    )
    options = parse_options(__doc__ or "payment", database="payment.db", extra=own)
    start_tracing(options, options.names.payment)
    assert options.database is not None  # it has a --db option, with a default
    engine = open_database(options.database)
    await create_schema(engine, metadata)
    bus = build(
        options.names,
        options.transport,
        engine,
        limit=options.extra["limit"],
        flaky=frozenset(options.extra["flaky_buyer"]),
        unanswered=frozenset(options.extra["unanswered_buyer"]),
    )
    await serve_with_database(bus, engine, stats=options.stats)


if __name__ == "__main__":
    asyncio.run(main())
