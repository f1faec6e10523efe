"""Scheduled delivery through the bus, on every transport: `send(delay=)`, `send(at=)`, `publish(at=)`.

A scheduled message is held back by the transport (its `not_before`) and so survives a restart of
the bus like any other message.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import TRANSPORTS, system_url, unique
from tests.helpers import eventually, running
from tidings import Bus, Command, ConfigurationError, Context, Event

#: Long enough that a message delivered at once (not_before ignored) is clearly early; short enough
#: to keep the tests quick.
DELAY = timedelta(seconds=1)
#: Transports keep time in milliseconds (AMQP TTLs, SQLite timestamps) and wall clocks are not
#: monotonic: "not before" is checked to this precision. A message that ignored its not-before
#: time would be early by nearly the whole DELAY.
CLOCK_PRECISION = timedelta(milliseconds=20)


class ShipOrder(Command, name="scheduling-test.ship-order"):
    order_id: int


class SaleStarted(Event, name="scheduling-test.sale-started"):
    sale_id: int


@pytest.fixture(params=TRANSPORTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return system_url(request.param, tmp_path)


@pytest.fixture
def name() -> Callable[[str], str]:
    """Unique service names, so RabbitMQ queues of different tests never meet."""
    suffix = unique("-")
    return lambda service: service + suffix


def recording(bus: Bus, handled: dict[int, datetime]) -> None:
    """Make `bus` handle ShipOrder, noting when each order was handled."""

    @bus.handle(ShipOrder)
    async def ship(command: ShipOrder, ctx: Context) -> None:
        handled[command.order_id] = datetime.now(UTC)


async def test_a_delayed_command_is_handled_after_its_delay_and_does_not_hold_up_others(
    url: str, name: Callable[[str], str]
) -> None:
    shipping = Bus(name("shipping"), url, concurrency=1)
    handled: dict[int, datetime] = {}
    recording(shipping, handled)

    async with running(shipping):
        sent_at = datetime.now(UTC)
        await shipping.send(ShipOrder(order_id=1), delay=DELAY)
        await shipping.send(ShipOrder(order_id=2))
        await eventually(lambda: len(handled) == 2)

    assert handled[1] >= sent_at + DELAY - CLOCK_PRECISION
    # Sent after the delayed one, handled before it: the scheduled message blocked nothing.
    assert handled[2] < handled[1]


async def test_a_command_sent_for_a_moment_is_handled_at_that_moment(
    url: str, name: Callable[[str], str]
) -> None:
    shipping = Bus(name("shipping"), url)
    sender = Bus(name("ordering"), url)
    sender.route(ShipOrder, to=shipping.service)
    handled: dict[int, datetime] = {}
    recording(shipping, handled)

    async with running(shipping), sender:
        due = datetime.now(UTC) + DELAY
        await sender.send(ShipOrder(order_id=1), at=due)
        await eventually(lambda: len(handled) == 1)

    assert handled[1] >= due - CLOCK_PRECISION


async def test_an_event_published_for_a_moment_reaches_every_subscriber_at_that_moment(
    url: str, name: Callable[[str], str]
) -> None:
    subscribers = [Bus(name("basket"), url), Bus(name("search"), url)]
    publisher = Bus(name("marketing"), url)
    seen: dict[str, datetime] = {}
    for subscriber in subscribers:

        @subscriber.subscribe(SaleStarted)
        async def on_sale(event: SaleStarted, ctx: Context) -> None:
            seen[ctx.service] = datetime.now(UTC)

    async with running(*subscribers), publisher:
        due = datetime.now(UTC) + DELAY
        await publisher.publish(SaleStarted(sale_id=1), at=due)
        await eventually(lambda: len(seen) == 2)

    assert set(seen) == {s.service for s in subscribers}
    assert all(moment >= due - CLOCK_PRECISION for moment in seen.values())


async def test_a_scheduled_command_survives_a_restart_of_the_bus_before_its_time(
    url: str, name: Callable[[str], str]
) -> None:
    service = name("shipping")
    before: dict[int, datetime] = {}
    after: dict[int, datetime] = {}
    first = Bus(service, url)
    recording(first, before)

    async with running(first):
        due = datetime.now(UTC) + 2 * DELAY
        await first.send(ShipOrder(order_id=1), at=due)
        await first.send(ShipOrder(order_id=0))
        await eventually(lambda: 0 in before)  # the first bus is consuming when it is stopped
    stopped_at = datetime.now(UTC)
    # A precondition, not a speed test: the restart must happen while the message is still held.
    assert stopped_at < due, "the bus took longer than the delay to stop; the test proves nothing"

    second = Bus(service, url)  # a new bus and a new transport object: a restarted process
    recording(second, after)
    async with running(second):
        await eventually(lambda: len(after) == 1)

    assert list(before) == [0]
    assert list(after) == [1]
    assert after[1] >= due - CLOCK_PRECISION


async def test_a_schedule_is_an_aware_moment_or_a_delay_not_both(name: Callable[[str], str]) -> None:
    shipping = Bus(name("shipping"), f"memory://{unique()}")
    recording(shipping, {})
    async with shipping:
        with pytest.raises(ConfigurationError, match="not both"):
            await shipping.send(ShipOrder(order_id=1), delay=DELAY, at=datetime.now(UTC))
        with pytest.raises(ConfigurationError, match="aware"):
            await shipping.send(ShipOrder(order_id=1), at=datetime.now())
