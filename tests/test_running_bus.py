"""A running bus owns its counters and applies changes to handlers and middleware from the next message.

The consume path reads the bus's handlers and middleware at each message and counts into the bus's
own `Stats`, so nothing is rebuilt (and reset, or left stale) when they change while it runs.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import unique
from tests.helpers import eventually, running
from tidings import Bus, Context, Event, Message, Next


class Ping(Event):
    n: int


class Pong(Event):
    n: int


async def test_the_counts_survive_subscribe_unsubscribe_and_use_on_a_running_bus() -> None:
    bus = Bus("counter", f"memory://{unique()}")
    seen: list[int] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        seen.append(event.n)

    async with running(bus):
        await bus.publish(Ping(n=1))
        await eventually(lambda: bus.stats.handled == 1)

        @bus.subscribe(Pong)
        async def on_pong(event: Pong, ctx: Context) -> None:
            seen.append(-event.n)

        async def passthrough(ctx: Context, message: Message, call_next: Next) -> Any:
            return await call_next(ctx, message)

        bus.use(passthrough)
        await bus.unsubscribe(Pong)
        assert bus.stats.handled == 1, "changing handlers or middleware reset the counters"
        await bus.publish(Ping(n=2))
        await eventually(lambda: bus.stats.handled == 2)
    assert seen == [1, 2]


async def test_middleware_added_to_a_running_bus_wraps_the_next_message() -> None:
    bus = Bus("wrapped", f"memory://{unique()}")
    wrapped: list[int] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        pass

    async with running(bus):
        await bus.publish(Ping(n=1))
        await eventually(lambda: bus.stats.handled == 1)

        async def record(ctx: Context, message: Message, call_next: Next) -> Any:
            assert isinstance(message, Ping)
            wrapped.append(message.n)
            return await call_next(ctx, message)

        bus.use(record)
        await bus.publish(Ping(n=2))
        await eventually(lambda: bus.stats.handled == 2)
    assert wrapped == [2]


async def test_a_handler_added_to_a_running_bus_handles_the_next_message() -> None:
    bus = Bus("late", f"memory://{unique()}")
    seen: list[int] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        pass

    async with running(bus):

        @bus.subscribe(Pong)
        async def on_pong(event: Pong, ctx: Context) -> None:
            seen.append(event.n)

        await eventually(lambda: not bus._background)  # the binding is made in the background
        await bus.publish(Pong(n=7))
        await eventually(lambda: seen == [7])
    assert bus.stats.dead_lettered == 0
