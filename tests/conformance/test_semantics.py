"""The bus's semantics, the same on every transport (docs/guarantees.md)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

from tests.helpers import eventually, running
from tidings import Bus, Command, Context, Event, NoRoute, RetryPolicy


class PriceChanged(Event):
    product_id: int
    seq: int


class Marker(Event):
    seq: int


class PlaceOrder(Command):
    order_id: int


class Unrouted(Command):
    x: int


async def test_an_event_is_handled_once_by_each_subscribing_service(
    transport_url: str, name: Callable[[str], str]
) -> None:
    basket = [Bus(name("basket"), transport_url) for _ in range(3)]
    search = Bus(name("search"), transport_url)
    catalog = Bus(name("catalog"), transport_url)  # publishes, subscribes to nothing of this
    seen: dict[str, list[int]] = {"basket": [], "search": []}

    for instance in basket:

        @instance.subscribe(PriceChanged)
        async def basket_handler(event: PriceChanged, ctx: Context) -> None:
            seen["basket"].append(event.seq)

    @search.subscribe(PriceChanged)
    async def search_handler(event: PriceChanged, ctx: Context) -> None:
        seen["search"].append(event.seq)

    @catalog.subscribe(Marker)
    async def catalog_handler(event: Marker, ctx: Context) -> None:
        raise AssertionError("catalog never subscribed to PriceChanged")

    async with running(*basket, search, catalog):
        for seq in range(60):
            await catalog.publish(PriceChanged(product_id=1, seq=seq))
        await eventually(lambda: len(seen["basket"]) >= 60 and len(seen["search"]) >= 60)
        await asyncio.sleep(0.3)  # room for a wrong extra copy to show up

    assert sorted(seen["basket"]) == list(range(60))
    assert sorted(seen["search"]) == list(range(60))
    assert catalog.stats.handled == 0
    assert catalog.stats.dead_lettered == 0


async def test_a_command_is_handled_by_exactly_one_instance_of_its_owner(
    transport_url: str, name: Callable[[str], str]
) -> None:
    ordering = [Bus(name("ordering"), transport_url) for _ in range(2)]
    basket = Bus(name("basket"), transport_url)
    basket.route(PlaceOrder, to=ordering[0].service)
    handled: Counter[int] = Counter()

    for instance in ordering:

        @instance.handle(PlaceOrder)
        async def place(command: PlaceOrder, ctx: Context) -> None:
            handled[command.order_id] += 1

    async with running(*ordering, basket):
        for order_id in range(50):
            await basket.send(PlaceOrder(order_id=order_id))
        await eventually(lambda: sum(handled.values()) >= 50)
        await asyncio.sleep(0.3)

    assert handled == Counter(range(50))


async def test_a_command_without_a_route_raises_before_anything_is_sent(
    transport_url: str, name: Callable[[str], str]
) -> None:
    basket = Bus(name("basket"), transport_url)
    async with basket:
        with pytest.raises(NoRoute, match="no route for command 'Unrouted'"):
            await basket.send(Unrouted(x=1))


async def test_a_command_routed_to_a_service_without_a_queue_raises(
    transport_url: str, name: Callable[[str], str]
) -> None:
    basket = Bus(name("basket"), transport_url)
    basket.route(Unrouted, to=name("nobody"))
    async with basket:
        with pytest.raises(NoRoute):
            await basket.send(Unrouted(x=1))


async def test_after_unsubscribe_new_events_of_that_type_are_not_delivered(
    transport_url: str, name: Callable[[str], str]
) -> None:
    basket = Bus(name("basket"), transport_url, concurrency=1)
    publisher = Bus(name("catalog"), transport_url)
    prices: list[int] = []
    markers: list[int] = []

    @basket.subscribe(PriceChanged)
    async def on_price(event: PriceChanged, ctx: Context) -> None:
        prices.append(event.seq)

    @basket.subscribe(Marker)
    async def on_marker(event: Marker, ctx: Context) -> None:
        markers.append(event.seq)

    async with running(basket, publisher):
        await publisher.publish(PriceChanged(product_id=1, seq=1))
        await eventually(lambda: prices == [1])
        await basket.unsubscribe(PriceChanged)
        await publisher.publish(PriceChanged(product_id=1, seq=2))
        # One queue, handled in order: once the marker is handled, a copy of seq 2 would have been.
        await publisher.publish(Marker(seq=1))
        await eventually(lambda: markers == [1])

    assert prices == [1]
    assert basket.stats.dead_lettered == 0  # seq 2 never reached the queue at all


async def test_a_handler_that_raises_gets_the_message_again(
    transport_url: str, name: Callable[[str], str]
) -> None:
    retry = RetryPolicy(immediate=1, delays=(0.2,), jitter=0)
    ordering = Bus(name("ordering"), transport_url, retry=retry)
    attempts: list[int] = []

    @ordering.handle(PlaceOrder)
    async def place(command: PlaceOrder, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) < 3:  # fails the first call and its immediate retry
            raise RuntimeError("database hiccup")

    async with running(ordering):
        await ordering.send(PlaceOrder(order_id=7))
        await eventually(lambda: ordering.stats.handled == 1)

    assert attempts == [1, 2, 3]  # two calls in the first round, the third after the delay
    assert ordering.stats.failed_attempts == 2
    assert ordering.stats.dead_lettered == 0


async def test_with_concurrency_one_messages_are_handled_in_publish_order(
    transport_url: str, name: Callable[[str], str]
) -> None:
    basket = Bus(name("basket"), transport_url, concurrency=1)
    publisher = Bus(name("catalog"), transport_url)
    seen: list[int] = []

    @basket.subscribe(PriceChanged)
    async def on_price(event: PriceChanged, ctx: Context) -> None:
        await asyncio.sleep(0)  # let other tasks run: order must not depend on there being none
        seen.append(event.seq)

    async with running(basket, publisher):
        for seq in range(100):
            await publisher.publish(PriceChanged(product_id=1, seq=seq))
        await eventually(lambda: len(seen) >= 100)

    assert seen == list(range(100))


async def test_messages_sent_from_a_handler_carry_the_conversation_on(
    transport_url: str, name: Callable[[str], str]
) -> None:
    catalog = Bus(name("catalog"), transport_url)
    ordering = Bus(name("ordering"), transport_url)
    ordering_ctx: list[Context] = []
    catalog.route(PlaceOrder, to=ordering.service)

    @catalog.subscribe(PriceChanged)
    async def on_price(event: PriceChanged, ctx: Context) -> None:
        await ctx.send(PlaceOrder(order_id=event.seq))

    @ordering.handle(PlaceOrder)
    async def place(command: PlaceOrder, ctx: Context) -> None:
        ordering_ctx.append(ctx)

    async with running(catalog, ordering):
        await catalog.publish(PriceChanged(product_id=1, seq=5), headers={"x-user": "ada"})
        await eventually(lambda: len(ordering_ctx) == 1)

    ctx = ordering_ctx[0]
    assert ctx.envelope.source == catalog.service
    assert ctx.causation_id is not None
    assert ctx.causation_id != ctx.message_id
    # The published event started the conversation, so its id is everyone's correlation id.
    assert ctx.correlation_id == ctx.causation_id


async def test_a_stop_asked_for_before_run_gets_going_is_not_lost(
    transport_url: str, name: Callable[[str], str]
) -> None:
    bus = Bus(name("basket"), transport_url)
    async with bus:
        task = asyncio.create_task(bus.run())
        bus.stop()  # run() has not started yet: this stop must still end it
        await asyncio.wait_for(task, timeout=10)
        # A later run() is a new run: it consumes until its own stop.
        again = asyncio.create_task(bus.run())
        await asyncio.sleep(0.2)
        assert not again.done()
        bus.stop()
        await asyncio.wait_for(again, timeout=10)
