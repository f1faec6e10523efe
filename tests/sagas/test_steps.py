"""Saga steps in one process: states and transitions, the outbox, timeouts, messages for no
instance, bad declarations. A real database (SQLite file, PostgreSQL) on the memory transport."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import BaseModel
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.sagas.sagas import Begin, Counting, Expire, Finish, Step, Waiting, effects
from tidings import (
    Bus,
    Command,
    ConfigurationError,
    Context,
    Event,
    Saga,
    SagaContext,
    Transition,
    handles,
    header,
    starts,
    timeout,
)
from tidings.sagas.store import sagas_table

# -- an order process, as in the eshop, with a recording "world" around it -----------------------


class OrderPlaced(Event, name="saga-steps.order-placed"):
    order_id: str
    amount: int


class StockReserved(Event, name="saga-steps.stock-reserved"):
    order_id: str


class PaymentSucceeded(Event, name="saga-steps.payment-succeeded"):
    order_id: str


class ReserveStock(Command, name="saga-steps.reserve"):
    order_id: str


class ChargePayment(Command, name="saga-steps.charge"):
    order_id: str
    amount: int


class ReleaseStock(Command, name="saga-steps.release"):
    order_id: str


class PaymentTimedOut(Command, name="saga-steps.payment-timed-out"):
    pass


class Order(BaseModel):
    order_id: str
    amount: int
    history: list[str] = []


class OrderProcess(Saga[Order], name="order-process", final=("confirmed", "cancelled")):
    #: How long the process waits for the payment (the tests set it short).
    patience = timedelta(seconds=30)

    @starts(OrderPlaced, by="order_id", to="reserving")
    async def placed(self, event: OrderPlaced, ctx: SagaContext) -> None:
        self.state = Order(order_id=event.order_id, amount=event.amount)
        await ctx.send(ReserveStock(order_id=event.order_id))

    @handles(StockReserved, by="order_id", during="reserving", to="charging")
    async def reserved(self, event: StockReserved, ctx: SagaContext) -> None:
        self.state.history.append("reserved")
        await ctx.send(ChargePayment(order_id=self.state.order_id, amount=self.state.amount))
        await ctx.timeout(PaymentTimedOut(), after=self.patience)

    @handles(PaymentSucceeded, by="order_id", during="charging", to="confirmed")
    async def paid(self, event: PaymentSucceeded, ctx: SagaContext) -> None:
        self.state.history.append("paid")

    @timeout(PaymentTimedOut, during="charging", to="cancelled")
    async def timed_out(self, message: PaymentTimedOut, ctx: SagaContext) -> None:
        self.state.history.append("timed out")
        await ctx.send(ReleaseStock(order_id=self.state.order_id))  # compensation: ordinary code


def shop(database: AsyncEngine, *, patience: float = 30.0) -> tuple[Bus, Bus, list[Command]]:
    """The ordering bus running the saga, and a "world" bus recording the commands it gets."""
    system = f"memory://{unique()}"
    OrderProcess.patience = timedelta(seconds=patience)
    ordering = Bus("ordering", system, database=database)
    ordering.saga(OrderProcess)
    world = Bus("world", system)
    for command in (ReserveStock, ChargePayment, ReleaseStock):
        ordering.route(command, to="world")
    received: list[Command] = []

    async def record(command: Command, ctx: Context) -> None:
        received.append(command)

    for command in (ReserveStock, ChargePayment, ReleaseStock):
        world.handle(command)(record)
    return ordering, world, received


async def step(bus: Bus, event: Event, steps: int) -> None:
    """Publish `event` and wait until the saga has saved `steps` steps (the events of one order
    would race each other otherwise: the bus handles several messages at once)."""
    await bus.publish(event)
    await eventually(lambda: bus.sagas is not None and bus.sagas.stats.steps == steps)


async def saga_rows(database: AsyncEngine) -> dict[str, tuple[str | None, int, bool]]:
    """key -> (status, version, completed) of every saga row."""
    async with database.connect() as connection:
        rows = await connection.execute(
            select(sagas_table.c.key, sagas_table.c.status, sagas_table.c.version, sagas_table.c.completed_at)
        )
        return {row.key: (row.status, row.version, row.completed_at is not None) for row in rows}


async def test_an_order_goes_through_its_states_and_its_messages_leave_through_the_outbox(
    database: AsyncEngine,
) -> None:
    ordering, world, received = shop(database)
    transitions: list[Transition] = []
    await ordering.create_tables()
    assert ordering.sagas is not None
    ordering.sagas.on_transition(transitions.append)
    async with running(ordering, world):
        await ordering.publish(OrderPlaced(order_id="o-1", amount=20))
        await eventually(lambda: any(isinstance(c, ReserveStock) for c in received))
        assert (await saga_rows(database))["o-1"] == ("reserving", 1, False)
        await ordering.publish(StockReserved(order_id="o-1"))
        await eventually(lambda: any(isinstance(c, ChargePayment) for c in received))
        await ordering.publish(PaymentSucceeded(order_id="o-1"))
        await eventually(lambda: ordering.sagas is not None and ordering.sagas.stats.completed == 1)
    assert (await saga_rows(database))["o-1"] == ("confirmed", 3, True)
    assert [(t.before, t.after, t.completed) for t in transitions] == [
        (None, "reserving", False),
        ("reserving", "charging", False),
        ("charging", "confirmed", True),
    ]
    assert ChargePayment(order_id="o-1", amount=20) in received
    assert ordering.sagas.stats.timeouts_scheduled == 1


async def test_a_payment_timeout_compensates(database: AsyncEngine) -> None:
    ordering, world, received = shop(database, patience=0.2)
    await ordering.create_tables()
    async with running(ordering, world):
        await step(ordering, OrderPlaced(order_id="o-2", amount=20), 1)
        await step(ordering, StockReserved(order_id="o-2"), 2)
        await eventually(lambda: ReleaseStock(order_id="o-2") in received)
        await eventually(lambda: ordering.sagas is not None and ordering.sagas.stats.completed == 1)
    assert (await saga_rows(database))["o-2"] == ("cancelled", 3, True)


async def test_a_timeout_for_a_saga_that_completed_meanwhile_is_ignored_and_counted(
    database: AsyncEngine,
) -> None:
    ordering, world, received = shop(database, patience=0.3)
    await ordering.create_tables()
    assert ordering.sagas is not None
    stats = ordering.sagas.stats
    async with running(ordering, world):
        await step(ordering, OrderPlaced(order_id="o-3", amount=20), 1)
        await step(ordering, StockReserved(order_id="o-3"), 2)
        await step(ordering, PaymentSucceeded(order_id="o-3"), 3)
        await eventually(lambda: stats.timeouts_ignored == 1)
    assert (await saga_rows(database))["o-3"] == ("confirmed", 3, True)
    assert ReleaseStock(order_id="o-3") not in received
    assert stats.dead_lettered == 0


async def test_a_message_out_of_its_state_is_ignored_and_counted(database: AsyncEngine) -> None:
    ordering, world, _received = shop(database)
    await ordering.create_tables()
    assert ordering.sagas is not None
    async with running(ordering, world):
        await step(ordering, OrderPlaced(order_id="o-4", amount=20), 1)
        await ordering.publish(PaymentSucceeded(order_id="o-4"))  # still reserving
        await eventually(lambda: ordering.sagas is not None and ordering.sagas.stats.out_of_state == 1)
    assert (await saga_rows(database))["o-4"] == ("reserving", 1, False)


async def test_messages_for_no_instance_are_ignored_and_counted_by_default(database: AsyncEngine) -> None:
    bus = Bus("waiting", f"memory://{unique()}", database=database)
    bus.saga(Waiting)
    await bus.create_tables()
    assert bus.sagas is not None
    stats = bus.sagas.stats
    async with running(bus):
        await bus.send(Finish(key="never-started"))
        await eventually(lambda: stats.ignored_missing == 1)
        await bus.send(Begin(key="w", after=60))
        await eventually(lambda: stats.started == 1)
        await bus.send(Finish(key="w"))
        await eventually(lambda: stats.completed == 1)
        await bus.send(Finish(key="w"))  # late news, under a new message id
        await bus.send(Begin(key="w", after=60))  # a start for a completed saga starts nothing
        await eventually(lambda: stats.ignored_completed == 2)
    assert bus.stats.dead_lettered == 0
    assert stats.started == 1
    assert (await saga_rows(database))["w"] == ("finished", 2, True)


class Count(BaseModel):
    n: int = 0


class Strict(Saga[Count], name="strict", missing="dead-letter"):
    @starts(Begin, by="key")
    async def begin(self, message: Begin, ctx: SagaContext) -> None:
        self.state.n += 1

    @handles(Finish, by="key")
    async def finish(self, message: Finish, ctx: SagaContext) -> None:
        self.complete()

    @handles(Step, by="key", missing="ignore")  # a step may have a policy of its own
    async def step(self, message: Step, ctx: SagaContext) -> None:
        self.state.n += message.n


async def test_the_dead_letter_policy_sends_messages_for_no_instance_to_the_error_queue_with_a_reason(
    database: AsyncEngine,
) -> None:
    bus = Bus("strict", f"memory://{unique()}", database=database)
    bus.saga(Strict)
    await bus.create_tables()
    assert bus.sagas is not None
    async with running(bus):
        await bus.send(Finish(key="nobody"))
        await bus.send(Step(key="nobody", n=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        await eventually(lambda: bus.sagas is not None and bus.sagas.stats.ignored_missing == 1)
        (dead,) = await bus.transport.dead_letters("strict")
    assert dead.headers["tidings-fault-reason"] == "rejected"
    assert "saga strict 'nobody': no instance for saga-test.finish" in dead.headers["tidings-fault-message"]
    assert bus.stats.failed_attempts == 0


async def test_a_step_that_raises_leaves_no_state_and_no_message_behind(database: AsyncEngine) -> None:
    class Boom(Exception):
        pass

    class Fragile(Saga[Count], name="fragile"):
        @starts(Begin, by="key")
        async def begin(self, message: Begin, ctx: SagaContext) -> None:
            self.state.n += 1
            await ctx.timeout(Expire(), after=timedelta(seconds=0))
            raise Boom("after the state change and the send")

        @timeout(Expire)
        async def expire(self, message: Expire, ctx: SagaContext) -> None:
            raise AssertionError("the timeout of a rolled-back step must never come")

    from tidings import RetryPolicy

    bus = Bus("fragile", f"memory://{unique()}", database=database, retry=RetryPolicy.none())
    bus.saga(Fragile)
    await bus.create_tables()
    async with running(bus):
        await bus.send(Begin(key="f", after=0))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        await asyncio.sleep(0.2)  # room for a wrongly sent timeout to arrive (it would fail the test)
    assert await saga_rows(database) == {}
    assert bus.stats.failed_attempts == 1


# -- declarations --------------------------------------------------------------------------------


def test_declarations_are_checked_when_the_class_is_made() -> None:
    with pytest.raises(ConfigurationError, match="no field 'nope'"):

        class WrongField(Saga[Count]):
            @starts(Begin, by="nope")
            async def begin(self, message: Begin, ctx: SagaContext) -> None: ...

    with pytest.raises(ConfigurationError, match="no step starts it"):

        class NoStart(Saga[Count]):
            @handles(Begin, by="key")
            async def begin(self, message: Begin, ctx: SagaContext) -> None: ...

    with pytest.raises(ConfigurationError, match="is taken by"):

        class Twice(Saga[Count]):
            @starts(Begin, by="key")
            async def one(self, message: Begin, ctx: SagaContext) -> None: ...

            @handles(Begin, by="key")
            async def two(self, message: Begin, ctx: SagaContext) -> None: ...

    with pytest.raises(ConfigurationError, match="Pydantic model"):

        class NotAModel(Saga[int]):  # type: ignore[type-var]
            pass

    with pytest.raises(ConfigurationError, match="needs a bus with a database"):
        Bus("no-database", "memory://x").saga(Counting)


async def test_a_message_can_find_its_instance_by_a_header(database: AsyncEngine) -> None:
    class ByHeader(Saga[Count], name="by-header"):
        @starts(Expire, by=header("x-tenant"))
        async def seen(self, message: Expire, ctx: SagaContext) -> None:
            self.state.n += 1

    bus = Bus("by-header", f"memory://{unique()}", database=database)
    bus.saga(ByHeader)
    await bus.create_tables()
    async with running(bus):
        for tenant in ("a", "b", "a"):
            await bus.send(Expire(), headers={"x-tenant": tenant})
        await eventually(lambda: bus.sagas is not None and bus.sagas.stats.steps == 3)
    assert {key: version for key, (_, version, _) in (await saga_rows(database)).items()} == {"a": 2, "b": 1}


async def test_a_bus_with_sagas_refuses_to_start_without_the_saga_table(database: AsyncEngine) -> None:
    async with database.begin() as connection:
        await connection.run_sync(lambda sync: sagas_table.drop(sync))
    bus = Bus("counting", f"memory://{unique()}", database=database)
    bus.saga(Counting)
    with pytest.raises(ConfigurationError, match="tidings_sagas"):
        await bus.start()
    await bus.close()
    await bus.create_tables()
    async with running(bus):
        await bus.send(Step(key="k", n=1))
        await eventually(lambda: bus.sagas is not None and bus.sagas.stats.steps == 1)
    async with database.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(effects))).scalar_one() == 1


async def test_an_integrity_error_of_the_step_itself_is_a_failure_not_a_conflict(
    database: AsyncEngine,
) -> None:
    class Clumsy(Saga[Count], name="clumsy"):
        @starts(Begin, by="key")
        async def begin(self, message: Begin, ctx: SagaContext) -> None:
            for _ in range(2):  # the same primary key twice: the service's own mistake
                await ctx.session.execute(insert(effects).values(id=1, key=message.key, n=0))

    from tidings import RetryPolicy

    bus = Bus("clumsy", f"memory://{unique()}", database=database, retry=RetryPolicy.none())
    bus.saga(Clumsy)
    await bus.create_tables()
    assert bus.sagas is not None
    async with running(bus):
        await bus.send(Begin(key="c", after=0))
        await eventually(lambda: bus.stats.dead_lettered == 1)
    assert bus.stats.failed_attempts == 1
    assert bus.sagas.stats.conflicts == 0
    assert await saga_rows(database) == {}
