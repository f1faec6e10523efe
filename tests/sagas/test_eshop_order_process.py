"""The eshop's order process (`examples/eshop/ordering.py`) as a saga, under the test harness:
a payment that never answers is cancelled by the saga's timeout, on the harness's clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.eshop import messages as m
from examples.eshop import ordering
from examples.eshop.service import Names, create_schema, open_database
from tidings.testing.pytest_plugin import HarnessFactory

NAMES = Names()
TEA = m.Line(product_id=1, product_name="Tea", unit_price=Decimal("4.00"), quantity=2)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = open_database(tmp_path / "ordering.db")
    await create_schema(engine, ordering.metadata)
    yield engine
    await engine.dispose()


async def test_a_payment_that_never_answers_is_cancelled_by_the_timeout(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    bus = ordering.build(NAMES, "memory://", engine, payment_timeout=timedelta(seconds=60))
    async with tidings_harness(bus) as h:
        await h.send(m.PlaceOrder(order_id="o-1", buyer="frank", lines=[TEA]))
        await h.idle()
        await h.publish(m.StockReserved(order_id="o-1"))
        await h.idle()
        assert len(h.sent(m.ChargePayment)) == 1
        assert h.published(m.OrderCancelled) == []  # the timeout waits on the harness's clock

        await h.advance(61)  # no PaymentSucceeded, no PaymentFailed: the minute passes
        assert h.published(m.OrderCancelled) == [
            m.OrderCancelled(order_id="o-1", reason="no answer from payment within 60 s")
        ]
        order = await h.request(m.GetOrder(order_id="o-1"), expect=m.OrderView)
        assert (order.status, order.step) == ("cancelled", None)

        # The payment's answer, late: the saga completed, nothing moves.
        await h.publish(m.PaymentSucceeded(order_id="o-1", amount=Decimal("8.00")))
        await h.idle()
        assert h.published(m.OrderConfirmed) == []
        assert bus.sagas is not None
        assert bus.sagas.stats.ignored_completed == 1


async def test_a_timeout_after_the_payment_is_ignored_and_counted(
    tidings_harness: HarnessFactory, engine: AsyncEngine
) -> None:
    bus = ordering.build(NAMES, "memory://", engine, payment_timeout=timedelta(seconds=60))
    async with tidings_harness(bus) as h:
        await h.send(m.PlaceOrder(order_id="o-2", buyer="alice", lines=[TEA]))
        await h.idle()
        await h.publish(m.StockReserved(order_id="o-2"))
        await h.idle()
        await h.publish(m.PaymentSucceeded(order_id="o-2", amount=Decimal("8.00")))
        await h.idle()
        assert h.published(m.OrderConfirmed) == [m.OrderConfirmed(order_id="o-2")]
        await h.advance(61)
        assert h.published(m.OrderCancelled) == []
        assert bus.sagas is not None
        assert bus.sagas.stats.timeouts_ignored == 1
