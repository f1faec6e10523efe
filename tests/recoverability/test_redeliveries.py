"""Redeliveries that arrive amid full flow are handled alone without counting their neighbours again.

A redelivered message (`delivery_count` > 1) may be the one that killed a process: the consumer
runs it alone, after the handlers in flight, and starts nothing else until it is settled. What
the receiver prefetched meanwhile stays with it. Given back, each of those messages would come
again counted once more (RabbitMQ counts a `basic.nack` before 4.3 and `x-acquired-count` always);
after a node loss two instances that took turns giving back the same redelivered messages pushed
one of them to the delivery limit (the cluster test in CI: "delivered 11 times without being
settled", though no handler had failed and no connection had dropped since the failover).

Real RabbitMQ: another consumer takes ten messages and its connection goes without an ack, so
they come again together, counted once, to a bus that consumes at its full prefetch.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import unique
from tests.helpers import eventually, running
from tidings import Bus, Command, Context
from tidings.transports.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq

BATCH = 10


class Job(Command):
    n: int


async def test_redeliveries_amid_full_flow_are_not_counted_again_by_the_consumer(rabbitmq_url: str) -> None:
    service = unique("redeliveries")
    # A delivery limit of 2: the ten come with a count of 2, and one more would dead-letter them.
    bus = Bus(service, rabbitmq_url, max_deliveries=2)
    bus.route(Job, to=service)
    handled: list[int] = []

    @bus.handle(Job)
    async def job(command: Job, ctx: Context) -> None:
        handled.append(command.n)

    other = RabbitMQTransport.from_url(rabbitmq_url)
    await bus.start()  # declares the queue
    await other.open()
    taken: list[object] = []

    async def take() -> None:
        async for delivery in other.receive(bus.queue, prefetch=BATCH):
            taken.append(delivery)  # held, never settled

    taking = asyncio.create_task(take())
    try:
        await asyncio.sleep(0.5)  # the other consumer is there first
        for n in range(BATCH):
            await bus.send(Job(n=n))
        await eventually(lambda: len(taken) == BATCH, timeout=10)
        async with running(bus):
            # A first delivery puts the bus's consumer at its full prefetch.
            await bus.send(Job(n=100))
            await eventually(lambda: handled == [100], timeout=10)
            # The other consumer's connection goes: its ten come again, together, counted once.
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
            await other.close()
            await eventually(lambda: len(handled) == BATCH + 1 or bus.stats.dead_lettered > 0, timeout=20)
            assert bus.stats.dead_lettered == 0, "a redelivered message was counted again"
            assert sorted(handled) == [*range(BATCH), 100]
    finally:
        taking.cancel()
        await asyncio.gather(taking, return_exceptions=True)
        await other.close()
        await bus.close()
