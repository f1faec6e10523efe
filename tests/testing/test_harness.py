"""The test harness (`tidings.testing.Harness`): a bus run on real parts, and what it did.

The tests that take `tidings_harness` run on a private memory broker, and on a real broker under
`--tidings-transport URL`: `test_pytest_plugin.py` runs this module again on SQLite and RabbitMQ.
The few that make a `Harness` themselves are about the memory broker or the harness's own rules.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Column, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tidings import (
    Bus,
    Command,
    ConfigurationError,
    Context,
    DeadLetters,
    Envelope,
    Event,
    Reject,
    RemoteError,
    Reply,
    RetryPolicy,
)
from tidings.storage import outbox_table
from tidings.testing import Harness
from tidings.testing.pytest_plugin import HarnessFactory
from tidings.transports.memory import MemoryTransport


class CheckoutBasket(Command, name="harness-test.checkout"):
    buyer: str


class PlaceOrder(Command, name="harness-test.place-order"):
    buyer: str


class BasketCheckedOut(Event, name="harness-test.checked-out"):
    buyer: str


class CheckoutResult(Reply, name="harness-test.checkout-result"):
    order: str


class PriceChanged(Event, name="harness-test.price-changed"):
    product: int


class Step(Command, name="harness-test.step"):
    n: int


class Ship(Command, name="harness-test.ship"):
    order: str


def basket_bus() -> Bus:
    """A bus that checks out baskets: it sends PlaceOrder to ordering, which does not run here."""
    bus = Bus("basket", "memory://")
    bus.route(PlaceOrder, to="ordering")

    @bus.handle(CheckoutBasket)
    async def checkout(command: CheckoutBasket, ctx: Context) -> CheckoutResult:
        await ctx.send(PlaceOrder(buyer=command.buyer))
        await ctx.publish(BasketCheckedOut(buyer=command.buyer))
        return CheckoutResult(order=f"order-of-{command.buyer}")

    return bus


async def test_what_a_handler_sends_to_a_service_not_running_here_is_captured(
    tidings_harness: HarnessFactory,
) -> None:
    bus = basket_bus()
    async with tidings_harness(bus) as h:
        await h.send(CheckoutBasket(buyer="alice"))
        await h.idle()

        assert h.sent(PlaceOrder) == [PlaceOrder(buyer="alice")]
        assert h.published(BasketCheckedOut) == [BasketCheckedOut(buyer="alice")]
        assert h.handled(CheckoutBasket) == [CheckoutBasket(buyer="alice")]
        assert not h.dead_lettered
        [delivered] = h.deliveries
        [to_ordering] = [o for o in h.outgoing if o.is_a(PlaceOrder)]

    # Sent as if from another service, and carried on by the bus as the same conversation.
    assert delivered.envelope.source == "harness"
    assert to_ordering.queue == "ordering"
    assert to_ordering.envelope.source == "basket"
    assert to_ordering.envelope.correlation_id == delivered.envelope.id
    assert to_ordering.envelope.causation_id == delivered.envelope.id
    # Nobody asked for a reply: the handler's result went nowhere.
    assert h.sent(CheckoutResult) == []


async def test_the_harness_runs_on_the_transport_pytest_was_given(
    tidings_harness: HarnessFactory, pytestconfig: pytest.Config
) -> None:
    given: str | None = pytestconfig.getoption("tidings_transport")
    bus = basket_bus()
    async with tidings_harness(bus) as h:
        await h.send(CheckoutBasket(buyer="zoe"))
        await h.idle()
        assert h.handled(CheckoutBasket) == [CheckoutBasket(buyer="zoe")]
        inner = getattr(bus.transport, "inner", None)
        if given is None or given.startswith("memory:"):
            assert h.real is None
            assert isinstance(inner, MemoryTransport)
        else:
            assert h.real is not None
            assert urlsplit(bus.transport.url).scheme == urlsplit(given).scheme
            assert not isinstance(inner, MemoryTransport)


async def test_a_request_gets_the_handlers_reply(tidings_harness: HarnessFactory) -> None:
    async with tidings_harness(basket_bus()) as h:
        result = await h.request(CheckoutBasket(buyer="bob"), expect=CheckoutResult)
        await h.idle()
        assert result == CheckoutResult(order="order-of-bob")
        assert h.sent(CheckoutResult) == [result]  # the reply is one of the messages the bus sent
        assert h.sent(PlaceOrder) == [PlaceOrder(buyer="bob")]


async def test_a_request_whose_handler_fails_for_good_raises_remote_error(
    tidings_harness: HarnessFactory,
) -> None:
    bus = Bus("basket", "memory://", retry=RetryPolicy.none())

    @bus.handle(CheckoutBasket)
    async def checkout(command: CheckoutBasket, ctx: Context) -> CheckoutResult:
        raise LookupError(f"no basket for {command.buyer}")

    async with tidings_harness(bus) as h:
        with pytest.raises(RemoteError, match="no basket for carol"):
            await h.request(CheckoutBasket(buyer="carol"), expect=CheckoutResult)
        await h.idle()
        [failed] = h.dead_lettered
    assert failed.fault.reason == "handler-failed"
    assert failed.fault.exception_type == "builtins.LookupError"


async def test_idle_waits_for_every_message_the_first_one_leads_to(tidings_harness: HarnessFactory) -> None:
    bus = Bus("steps", "memory://")
    steps: list[int] = []

    @bus.handle(Step)
    async def step(command: Step, ctx: Context) -> None:
        steps.append(command.n)
        await asyncio.sleep(0.01)  # each handler takes a moment: nothing is done at once
        if command.n < 5:
            await ctx.send(Step(n=command.n + 1))

    async with tidings_harness(bus) as h:
        await h.send(Step(n=1))
        await h.idle()
        assert steps == [1, 2, 3, 4, 5]
        assert len(h.handled(Step)) == 5


async def test_an_event_reaches_the_bus_only_if_it_subscribed(tidings_harness: HarnessFactory) -> None:
    bus = Bus("pricing", "memory://")
    seen: list[int] = []

    @bus.subscribe(PriceChanged)
    async def on_price(event: PriceChanged, ctx: Context) -> None:
        seen.append(event.product)

    async with tidings_harness(bus) as h:
        await h.publish(PriceChanged(product=7))
        await h.publish(BasketCheckedOut(buyer="nobody listens"))
        await h.idle()
        assert seen == [7]
        assert h.handled(PriceChanged) == [PriceChanged(product=7)]
        assert [d.wire_name for d in h.deliveries] == ["harness-test.price-changed"]


async def test_skipped_retry_delays_run_every_round_and_the_dead_letter_says_why(
    tidings_harness: HarnessFactory,
) -> None:
    bus = Bus("payment", "memory://", retry=RetryPolicy(immediate=1, delays=(30.0, 60.0), jitter=0.0))
    attempts: list[int] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError(f"the carrier is down for {command.order}")

    async with tidings_harness(bus, retry_delays="skip") as h:
        await h.send(Ship(order="o-1"))
        await h.idle()  # a minute and a half of delays, skipped: idle waits for every round

        assert attempts == [1, 2, 3, 4, 5, 6]
        assert [d.outcome for d in h.deliveries] == ["retried", "retried", "dead-lettered"]
        assert [d.delay for d in h.deliveries[:2]] == [30.0, 60.0]  # what the policy asked for
        [failed] = h.dead_lettered
    assert failed.fault.reason == "handler-failed"
    assert failed.fault.attempts == 6
    assert failed.fault.exception_type == "builtins.ConnectionError"
    assert failed.fault.message == "the carrier is down for o-1"
    assert failed.type == "harness-test.ship"


async def test_compressed_retry_delays_are_waited_for(tidings_harness: HarnessFactory) -> None:
    bus = Bus("payment", "memory://", retry=RetryPolicy(immediate=0, delays=(5.0, 5.0), jitter=0.0))
    attempts: list[int] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TimeoutError("no answer from the carrier")

    async with tidings_harness(bus, retry_delays=0.02) as h:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await h.send(Ship(order="o-2"))
        await h.idle()
        took = loop.time() - started
        assert attempts == [1, 2, 3]
        assert h.handled(Ship) == [Ship(order="o-2")]
        assert not h.dead_lettered
    assert 0.2 <= took < 5.0  # two delays of 5 s, a fiftieth of each: really waited, not 10 s


async def test_a_kept_retry_delay_waits_for_the_clock(tidings_harness: HarnessFactory) -> None:
    bus = Bus("payment", "memory://", retry=RetryPolicy(immediate=0, delays=(1.0,), jitter=0.0))
    attempts: list[int] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise TimeoutError("no answer from the carrier")

    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-3"))
        await h.idle()
        assert attempts == [1]  # retried later: held until the clock gets there
        assert h.scheduled == 1
        assert not h.handled(Ship)

        await h.advance(1.0)
        assert attempts == [1, 2]
        assert h.handled(Ship) == [Ship(order="o-3")]
        assert h.scheduled == 0


async def test_a_scheduled_message_is_handled_once_the_clock_gets_there(
    tidings_harness: HarnessFactory,
) -> None:
    bus = Bus("shipping", "memory://")
    shipped: list[str] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        shipped.append(command.order)

    async with tidings_harness(bus) as h:
        await h.send(Ship(order="later"), delay=timedelta(seconds=1))
        await h.send(Ship(order="now"))
        await h.idle()
        assert shipped == ["now"]
        assert h.scheduled == 1

        await h.advance(timedelta(seconds=1))
        assert shipped == ["now", "later"]


async def test_an_hour_passes_at_once_on_the_memory_broker() -> None:
    bus = Bus("shipping", "memory://")
    shipped: list[str] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        shipped.append(command.order)
        if command.order == "first":
            # A handler scheduling a follow-up an hour on, from the wall clock as services do.
            await ctx.send(Ship(order="an hour on"), at=datetime.now(UTC) + timedelta(hours=1))

    async with Harness(bus) as h:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await h.send(Ship(order="first"))
        await h.idle()
        await h.advance(timedelta(minutes=59))
        assert shipped == ["first"]
        await h.advance(timedelta(minutes=1))
        assert shipped == ["first", "an hour on"]
        assert h.clock.offset == timedelta(hours=1)
        assert loop.time() - started < 5


async def test_reject_goes_to_the_error_queue_at_once(tidings_harness: HarnessFactory) -> None:
    bus = Bus("shipping", "memory://")

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        raise Reject(f"order {command.order} cannot be shipped")

    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-4"))
        await h.idle()
        [failed] = h.dead_lettered
    assert failed.fault.reason == "rejected"
    assert failed.fault.attempts == 1


async def test_a_message_nobody_handles_is_dead_lettered_as_unknown_type(
    tidings_harness: HarnessFactory,
) -> None:
    async with tidings_harness(basket_bus()) as h:
        await h.deliver(Envelope(type="harness-test.mystery", source="elsewhere", body=b"{}"))
        await h.idle()
        [failed] = h.dead_lettered
    assert failed.fault.reason == "unknown-type"
    assert failed.type == "harness-test.mystery"


async def test_a_replayed_dead_letter_is_waited_for(tidings_harness: HarnessFactory) -> None:
    bus = Bus("shipping", "memory://", retry=RetryPolicy.none())
    carrier_up = False

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        if not carrier_up:
            raise ConnectionError("the carrier is down")

    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-5"))
        await h.idle()
        assert len(h.dead_lettered) == 1

        carrier_up = True
        assert await DeadLetters(bus.transport, bus.service).replay_all() == 1
        await h.idle()
        assert h.handled(Ship) == [Ship(order="o-5")]


async def test_idle_fails_saying_what_is_still_in_flight() -> None:
    bus = Bus("slow", "memory://", shutdown_grace=5.0)
    release = asyncio.Event()

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        await release.wait()

    async with Harness(bus) as h:
        await h.send(Ship(order="o-6"))
        with pytest.raises(
            TimeoutError, match=r"slow was not idle within 0.2 s: 1 delivery\(ies\) not settled"
        ):
            await h.idle(timeout=0.2)
        release.set()
        await h.idle()
        assert h.handled(Ship) == [Ship(order="o-6")]


async def test_the_bus_gets_its_transport_back_and_can_be_run_again() -> None:
    bus = basket_bus()
    own = bus.transport
    async with Harness(bus) as h:
        assert bus.transport is not own
        await h.send(CheckoutBasket(buyer="dave"))
        await h.idle()
    assert bus.transport is own

    async with Harness(bus) as again:
        await again.send(CheckoutBasket(buyer="erin"))
        await again.idle()
        # A new harness, a new private broker: nothing of the first run is seen.
        assert again.sent(PlaceOrder) == [PlaceOrder(buyer="erin")]


async def test_each_harness_has_a_private_broker() -> None:
    async with Harness(basket_bus()) as first, Harness(basket_bus()) as second:
        await first.send(CheckoutBasket(buyer="frank"))
        await first.idle()
        await second.idle()
        assert second.handled(CheckoutBasket) == []
        inner = first.bus.transport
        assert isinstance(getattr(inner, "inner", None), MemoryTransport)
        assert inner.url.startswith("memory://harness-")


async def test_a_bus_that_is_open_already_is_refused() -> None:
    bus = basket_bus()
    async with bus:
        with pytest.raises(ConfigurationError, match="is open"):
            async with Harness(bus):
                pass
    with pytest.raises(ConfigurationError, match="must not be the bus's own service"):
        Harness(bus, source="basket")
    with pytest.raises(ConfigurationError, match="retry_delays"):
        Harness(bus, retry_delays=-1.0)


# -- with a database: the outbox and the inbox against the test's own engine --------------------

notes_metadata = MetaData()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        made = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")
    else:
        made = create_async_engine(request.getfixturevalue("postgres_url"))
    try:
        yield made
    finally:
        await made.dispose()


@pytest.fixture
async def notes(engine: AsyncEngine) -> AsyncIterator[Table]:
    """The service's own table (its name unique: PostgreSQL's test database is shared)."""
    table = Table(
        f"harness_notes_{uuid.uuid4().hex[:10]}",
        notes_metadata,
        Column("order_id", String(64), primary_key=True),
    )
    async with engine.begin() as connection:
        await connection.run_sync(table.create)
    try:
        yield table
    finally:
        async with engine.begin() as connection:
            await connection.run_sync(table.drop)
        notes_metadata.remove(table)


async def test_a_start_that_fails_gives_the_bus_its_transport_back(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    try:
        bus = Bus("shipping", "memory://", database=engine)
        own = bus.transport
        with pytest.raises(ConfigurationError, match="create_tables"):
            async with Harness(bus, create_tables=False):  # the tables are the test's to make
                pass
        assert bus.transport is own
    finally:
        await engine.dispose()


class OrderShipped(Event, name="harness-test.order-shipped"):
    order: str


def shipping_bus(
    engine: AsyncEngine, notes: Table, *, fail_after_write: bool = False
) -> tuple[Bus, list[str]]:
    """A bus whose handler notes the order and publishes through the outbox; and its calls."""
    service = f"shipping-{uuid.uuid4().hex[:8]}"  # outbox and inbox rows are per service
    bus = Bus(service, "memory://", database=engine, retry=RetryPolicy.none())
    calls: list[str] = []

    @bus.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        calls.append(command.order)
        await ctx.session.execute(insert(notes).values(order_id=command.order))
        await ctx.publish(OrderShipped(order=command.order))  # the outbox, in this transaction
        if fail_after_write:
            raise RuntimeError("the label printer jammed")

    return bus, calls


async def test_an_outbox_write_is_shipped_after_its_transaction_committed(
    tidings_harness: HarnessFactory, engine: AsyncEngine, notes: Table
) -> None:
    bus, _ = shipping_bus(engine, notes)
    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-7"))
        await h.idle()  # the relay has shipped the row too
        assert h.published(OrderShipped) == [OrderShipped(order="o-7")]

    columns = outbox_table.c
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(columns.sent_at, columns.queue).where(columns.service == bus.service)
            )
        ).all()
        assert (await connection.scalars(select(notes.c.order_id))).all() == ["o-7"]
    [(sent_at, queue)] = rows
    assert sent_at is not None
    assert queue is None  # shipped as a publish


async def test_a_failed_handler_leaves_neither_its_writes_nor_its_messages(
    tidings_harness: HarnessFactory, engine: AsyncEngine, notes: Table
) -> None:
    bus, _ = shipping_bus(engine, notes, fail_after_write=True)
    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-8"))
        await h.idle()
        assert h.published(OrderShipped) == []
        [failed] = h.dead_lettered
    assert failed.fault.message == "the label printer jammed"
    async with engine.connect() as connection:
        assert (await connection.scalars(select(notes.c.order_id))).all() == []


async def test_the_inbox_acknowledges_a_duplicate_without_calling_the_handler(
    tidings_harness: HarnessFactory, engine: AsyncEngine, notes: Table
) -> None:
    bus, calls = shipping_bus(engine, notes)
    async with tidings_harness(bus) as h:
        await h.send(Ship(order="o-9"))
        await h.idle()
        await h.deliver(h.deliveries[0].envelope)  # the same message, its id and all, once more
        await h.idle()

        assert calls == ["o-9"]
        assert bus.stats.duplicates == 1
        assert h.handled(Ship) == [Ship(order="o-9"), Ship(order="o-9")]  # both acknowledged
        assert h.published(OrderShipped) == [OrderShipped(order="o-9")]
