"""`async with bus.running():` runs a bus in the background of the block, under supervision.

- A consumer that fails on a transient error is logged and started again after a growing wait; a
  queue deleted under it comes back (RabbitMQ).
- A fatal error ends the block and is raised out of it, the bus closed.
- The exit lets an in-flight handler finish: its message is settled, never handled again.
- With a database the relay ships the outbox while the block runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import rabbitmq_system_url, system_url, unique
from tests.helpers import eventually
from tests.storage.databases import sqlite_engine
from tidings import (
    Bus,
    Command,
    ConfigurationError,
    Context,
    Delivery,
    Event,
    TransportClosed,
    TransportError,
    Unavailable,
)
from tidings.transports.memory import MemoryTransport


class Work(Command):
    n: int


class Placed(Event):
    n: int


class FailingReceive(MemoryTransport):
    """A memory transport whose next `receive()` calls on one queue fail, one error each."""

    failing_queue = ""
    errors: list[Exception]

    async def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        if queue == self.failing_queue and self.errors:
            raise self.errors.pop(0)
        async for delivery in super().receive(queue, prefetch=prefetch):
            yield delivery


def failing(service: str, *errors: Exception) -> FailingReceive:
    transport = FailingReceive.from_url(f"memory://{unique()}")
    assert isinstance(transport, FailingReceive)
    transport.failing_queue, transport.errors = service, list(errors)
    return transport


def worker(bus: Bus, handled: list[int]) -> Bus:
    @bus.handle(Work)
    async def work(command: Work, ctx: Context) -> None:
        handled.append(command.n)

    return bus


async def test_a_consumer_that_fails_is_restarted_after_a_growing_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors = (TransportError("connection lost"), Unavailable("broker busy"), TransportError("lost again"))
    handled: list[int] = []
    bus = worker(Bus("flaky", failing("flaky", *errors)), handled)
    caplog.set_level(logging.WARNING, logger="tidings.supervision")
    async with bus.running(restart_delay=0.01, max_restart_delay=1.0) as running:
        await bus.send(Work(n=1))
        await eventually(lambda: handled == [1])
        assert running.restarts == 3
    restarts = [record for record in caplog.records if record.name == "tidings.supervision"]
    assert [getattr(record, "restart_delay", None) for record in restarts] == [0.01, 0.02, 0.04]
    assert [record.exc_info[1] for record in restarts if record.exc_info] == list(errors)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug under the consumer"), ConfigurationError("unusable"), TransportClosed("closed")],
    ids=type,
)
async def test_a_fatal_error_is_raised_out_of_the_block(error: Exception) -> None:
    bus = worker(Bus("doomed", failing("doomed", error)), [])
    ended_by: list[str] = []

    async def serve_forever() -> None:
        # The timeout only bounds a broken test: the bus's failure must end the block, not it.
        async with asyncio.timeout(15), bus.running(restart_delay=0.01):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError as cancelled:
                ended_by.append(str(cancelled))
                raise

    with pytest.raises(type(error)) as raised:
        await serve_forever()
    assert raised.value is error
    assert ended_by == ["tidings doomed: the bus failed"], "the block was not ended by the bus's failure"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0, "the block's cancellation was not taken back"
    with pytest.raises(TransportClosed):
        await bus.send(Work(n=1))  # the exit closed the bus


async def test_an_error_of_the_block_goes_through_and_the_bus_is_closed() -> None:
    handled: list[int] = []
    bus = worker(Bus("body", f"memory://{unique()}"), handled)

    async def failing_app() -> None:
        async with bus.running():
            await bus.send(Work(n=1))
            await eventually(lambda: handled == [1])
            raise LookupError("the app failed")

    with pytest.raises(LookupError):
        await failing_app()
    with pytest.raises(TransportClosed):
        await bus.send(Work(n=2))


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return system_url(request.param, tmp_path)


async def test_the_exit_lets_an_in_flight_handler_finish_and_settle(
    url: str, name: Callable[[str], str]
) -> None:
    service = name("graceful")
    handled: list[tuple[str, int]] = []
    started = asyncio.Event()
    first = Bus(service, url, concurrency=1)

    @first.handle(Work)
    async def slow(command: Work, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(0.3)  # work still going on when the block ends
        handled.append(("first", command.n))

    async with first.running():
        await first.send(Work(n=1))
        await asyncio.wait_for(started.wait(), 15)
    assert handled == [("first", 1)], "the exit did not wait for the handler"

    # Had message 1 gone back unsettled, the next instance would handle it before message 2.
    second = Bus(service, url, concurrency=1)

    @second.handle(Work)
    async def quick(command: Work, ctx: Context) -> None:
        handled.append(("second", command.n))

    async with second.running():
        await second.send(Work(n=2))
        await eventually(lambda: len(handled) == 2)
    assert handled == [("first", 1), ("second", 2)]


async def test_the_relay_ships_outbox_rows_while_running(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path / "service.db")
    bus = Bus("relaying", f"memory://{unique()}", database=engine)
    seen: list[int] = []

    @bus.subscribe(Placed)
    async def on_placed(event: Placed, ctx: Context) -> None:
        seen.append(event.n)

    try:
        await bus.create_tables()
        async with bus.running():
            async with AsyncSession(engine) as session, session.begin():
                await bus.publish(Placed(n=1), session=session)
            await eventually(lambda: seen == [1])
    finally:
        await engine.dispose()


@pytest.mark.rabbitmq
async def test_a_queue_deleted_under_the_consumer_is_declared_again_and_consumed() -> None:
    handled: list[int] = []
    bus = worker(Bus(unique("deleted"), rabbitmq_system_url()), handled)
    async with bus.running(restart_delay=0.05) as running:
        # The broker cancels the consumer of a deleted queue: a TransportError out of run().
        channel = await bus.transport.connection().channel()  # type: ignore[attr-defined]
        await channel.queue_delete(bus.transport.topology.queue(bus.queue))  # type: ignore[attr-defined]
        await channel.close()
        await eventually(lambda: running.restarts == 1, timeout=30)
        await bus.send(Work(n=1))
        await eventually(lambda: handled == [1], timeout=30)
