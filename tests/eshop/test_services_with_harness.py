"""Unit tests of the eshop's services, one service at a time, with `tidings.testing`.

Each test runs one service's real bus (handlers, middleware, inbox, outbox, retry policy) against
its own SQLite database, and plays the other services: their requests, commands and events come
from the harness, and what the service sends them is captured, since they do not run here.
`pytest --tidings-transport URL` runs the same tests on a real broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.eshop import basket, catalog, ordering, payment
from examples.eshop import messages as m
from examples.eshop.service import Names, create_schema, open_database
from tidings import Bus
from tidings.testing.pytest_plugin import HarnessFactory

NAMES = Names()
TEA = m.Line(product_id=1, product_name="Tea", unit_price=Decimal("4.00"), quantity=2)
COFFEE = m.Line(product_id=2, product_name="Coffee", unit_price=Decimal("9.00"), quantity=1)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The service's own database, set up as the service sets up its own (WAL, BEGIN IMMEDIATE)."""
    made = open_database(tmp_path / "service.db")
    try:
        yield made
    finally:
        await made.dispose()


def add(buyer: str, line: m.Line) -> m.AddBasketItem:
    return m.AddBasketItem(buyer=buyer, **line.model_dump())


# -- basket --------------------------------------------------------------------------------------


async def test_basket_checkout_empties_the_basket_and_sends_place_order_to_ordering(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, basket.metadata)
    async with tidings_harness(basket.build(NAMES, "memory://", engine)) as h:
        await h.request(add("alice", TEA), expect=m.BasketView)
        view = await h.request(add("alice", COFFEE), expect=m.BasketView)
        assert view.total == Decimal("17.00")

        result = await h.request(m.CheckoutBasket(buyer="alice"), expect=m.CheckoutResult)
        await h.idle()

        assert result.order_id is not None
        assert h.sent(m.PlaceOrder) == [
            m.PlaceOrder(order_id=result.order_id, buyer="alice", lines=[TEA, COFFEE])
        ]
        [to_ordering] = [o for o in h.outgoing if o.is_a(m.PlaceOrder)]
        assert to_ordering.queue == NAMES.ordering
        emptied = await h.request(m.GetBasket(buyer="alice"), expect=m.BasketView)
        assert emptied.lines == []
        assert not h.dead_lettered


async def test_basket_checkout_of_an_empty_basket_orders_nothing(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, basket.metadata)
    async with tidings_harness(basket.build(NAMES, "memory://", engine)) as h:
        result = await h.request(m.CheckoutBasket(buyer="nobody"), expect=m.CheckoutResult)
        await h.idle()
        assert result == m.CheckoutResult(order_id=None, reason="the basket is empty")
        assert h.sent(m.PlaceOrder) == []


async def test_basket_reprices_on_a_price_change_and_tells_each_buyer_once(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, basket.metadata)
    bus = basket.build(NAMES, "memory://", engine)
    async with tidings_harness(bus) as h:
        await h.request(add("alice", TEA), expect=m.BasketView)
        await h.request(add("bob", TEA), expect=m.BasketView)
        await h.publish(
            m.ProductPriceChanged(
                product_id=1, product_name="Tea", old_price=Decimal("4.00"), new_price=Decimal("5.00")
            )
        )
        await h.idle()
        # The same event once more, its id and all (a redelivery): the inbox drops it.
        [price_change] = [d for d in h.deliveries if d.is_a(m.ProductPriceChanged)]
        await h.deliver(price_change.envelope)
        await h.idle()

        for buyer in ("alice", "bob"):
            view = await h.request(m.GetBasket(buyer=buyer), expect=m.BasketView)
            assert [line.unit_price for line in view.lines] == [Decimal("5.00")]
            assert view.notices == ["Tea: price changed from 4.00 to 5.00"]
        assert bus.stats.duplicates == 1


# -- catalog -------------------------------------------------------------------------------------


async def test_catalog_publishes_a_price_change_with_the_new_price_and_only_on_a_change(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await catalog.seed(engine)
    async with tidings_harness(catalog.build(NAMES, "memory://", engine)) as h:
        changed = await h.request(
            m.ChangeProductPrice(product_id=1, new_price=Decimal("4.50")), expect=m.PriceChangeResult
        )
        unchanged = await h.request(
            m.ChangeProductPrice(product_id=1, new_price=Decimal("4.50")), expect=m.PriceChangeResult
        )
        await h.idle()

        assert changed.old_price == Decimal("4.00")
        assert changed.product is not None
        assert changed.product.price == Decimal("4.50")
        assert unchanged.old_price == Decimal("4.50")
        assert h.published(m.ProductPriceChanged) == [
            m.ProductPriceChanged(
                product_id=1, product_name="Tea", old_price=Decimal("4.00"), new_price=Decimal("4.50")
            )
        ]


async def test_catalog_reserves_stock_refuses_what_it_lacks_and_takes_back_a_cancelled_order(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await catalog.seed(engine)
    machine = m.Line(product_id=3, product_name="Espresso machine", unit_price=Decimal("450.00"), quantity=2)
    async with tidings_harness(catalog.build(NAMES, "memory://", engine)) as h:
        await h.send(m.ReserveStock(order_id="o-1", lines=[machine]))
        await h.send(m.ReserveStock(order_id="o-2", lines=[machine.model_copy(update={"quantity": 10})]))
        await h.idle()
        assert h.published(m.StockReserved) == [m.StockReserved(order_id="o-1")]
        assert h.published(m.StockReservationFailed) == [
            m.StockReservationFailed(order_id="o-2", reason="only 3 of Espresso machine in stock, 10 wanted")
        ]

        await h.publish(m.OrderCancelled(order_id="o-1", reason="payment declined"))
        await h.idle()
        details = await h.request(m.GetProduct(product_id=3), expect=m.ProductDetails)
        assert details.product is not None
        assert details.product.stock == 5  # the two reserved for o-1 are back


# -- ordering ------------------------------------------------------------------------------------


async def test_ordering_runs_an_order_through_its_steps_to_confirmed(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, ordering.metadata)
    async with tidings_harness(ordering.build(NAMES, "memory://", engine)) as h:
        await h.send(m.PlaceOrder(order_id="o-1", buyer="alice", lines=[TEA, COFFEE]))
        await h.idle()
        assert h.sent(m.ReserveStock) == [m.ReserveStock(order_id="o-1", lines=[TEA, COFFEE])]

        await h.publish(m.StockReserved(order_id="o-1"))
        await h.idle()
        assert h.sent(m.ChargePayment) == [
            m.ChargePayment(order_id="o-1", buyer="alice", amount=Decimal("17.00"))
        ]

        await h.publish(m.PaymentSucceeded(order_id="o-1", amount=Decimal("17.00")))
        await h.idle()
        assert h.published(m.OrderConfirmed) == [m.OrderConfirmed(order_id="o-1")]

        # News that comes late (the stock again, under a new id) moves nothing on.
        await h.publish(m.StockReserved(order_id="o-1"))
        await h.idle()
        assert len(h.sent(m.ChargePayment)) == 1
        order = await h.request(m.GetOrder(order_id="o-1"), expect=m.OrderView)
        assert (order.status, order.step, order.total) == ("confirmed", None, Decimal("17.00"))
        targets = {o.queue for o in h.outgoing if o.is_a(m.ReserveStock) or o.is_a(m.ChargePayment)}
        assert targets == {NAMES.catalog, NAMES.payment}


async def test_ordering_cancels_an_order_whose_payment_was_declined(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, ordering.metadata)
    async with tidings_harness(ordering.build(NAMES, "memory://", engine)) as h:
        await h.send(m.PlaceOrder(order_id="o-2", buyer="bob", lines=[TEA]))
        await h.publish(m.StockReserved(order_id="o-2"))
        await h.idle()
        await h.publish(m.PaymentFailed(order_id="o-2", reason="over the limit"))
        await h.idle()

        assert h.published(m.OrderCancelled) == [m.OrderCancelled(order_id="o-2", reason="over the limit")]
        assert h.published(m.OrderConfirmed) == []
        order = await h.request(m.GetOrder(order_id="o-2"), expect=m.OrderView)
        assert (order.status, order.reason) == ("cancelled", "over the limit")


# -- payment -------------------------------------------------------------------------------------


def payment_bus(engine: AsyncEngine, *, flaky: frozenset[str] = frozenset()) -> Bus:
    return payment.build(NAMES, "memory://", engine, limit=Decimal(300), flaky=flaky)


async def test_payment_charges_within_the_limit_and_declines_above_it(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, payment.metadata)
    async with tidings_harness(payment_bus(engine)) as h:
        await h.send(m.ChargePayment(order_id="o-1", buyer="alice", amount=Decimal("17.00")))
        await h.send(m.ChargePayment(order_id="o-2", buyer="bob", amount=Decimal("450.00")))
        await h.idle()

        assert h.published(m.PaymentSucceeded) == [
            m.PaymentSucceeded(order_id="o-1", amount=Decimal("17.00"))
        ]
        assert h.published(m.PaymentFailed) == [
            m.PaymentFailed(order_id="o-2", reason="amount 450.00 is over the limit of 300")
        ]
        # A declined charge is a business outcome, not a failure: handled once, nothing retried.
        assert [d.outcome for d in h.deliveries] == ["acked", "acked"]


async def test_payment_retries_a_provider_timeout_later(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    await create_schema(engine, payment.metadata)
    async with tidings_harness(payment_bus(engine, flaky=frozenset({"carol"}))) as h:
        await h.send(m.ChargePayment(order_id="o-3", buyer="carol", amount=Decimal("9.00")))
        await h.idle()
        [first] = h.deliveries
        assert first.outcome == "retried"
        assert first.delay == pytest.approx(0.5, rel=0.1)  # payment's RETRY: 0.5 s, then 2 s, 5 s
        assert h.published(m.PaymentSucceeded) == []
        assert h.scheduled == 1

        await h.advance(0.6)  # past the first delay, its jitter included
        assert h.published(m.PaymentSucceeded) == [m.PaymentSucceeded(order_id="o-3", amount=Decimal("9.00"))]
        assert not h.dead_lettered
