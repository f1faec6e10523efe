"""The memory transport on a clock of the test's (`MemoryTransport(clock=...)`, `MemoryBroker.wake`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tidings import Envelope
from tidings.testing import Clock
from tidings.transports.base import Delivery
from tidings.transports.memory import MemoryBroker, MemoryTransport

#: Longer than it takes to hand out a message that is there, far shorter than the receiver's own
#: half-second look: a message delivered within this was woken, not found by polling.
PROMPTLY = 0.2


@pytest.fixture
async def clocked() -> AsyncIterator[tuple[MemoryTransport, Clock]]:
    clock = Clock()
    broker = MemoryBroker()
    clock.on_advance(broker.wake)
    transport = MemoryTransport(broker, url="memory://clock-test", clock=clock.now)
    async with transport:
        await transport.declare_queue("q")
        yield transport, clock


def envelope(n: int) -> Envelope:
    return Envelope(type="clock-test.job", source="test", body=f'{{"n": {n}}}'.encode())


class Received:
    """Takes deliveries from a queue in a task of its own (cancelling `anext` on the transport's
    iterator would end it), so the test can wait for the next one with a time limit."""

    def __init__(self, transport: MemoryTransport, queue: str) -> None:
        self._got: asyncio.Queue[Delivery] = asyncio.Queue()
        self._task = asyncio.create_task(self._take(transport, queue))

    async def _take(self, transport: MemoryTransport, queue: str) -> None:
        async for delivery in transport.receive(queue, prefetch=10):
            await self._got.put(delivery)

    async def next_within(self, seconds: float) -> Delivery | None:
        try:
            async with asyncio.timeout(seconds):
                return await self._got.get()
        except TimeoutError:
            return None

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_scheduled_message_comes_when_the_clock_gets_there(
    clocked: tuple[MemoryTransport, Clock],
) -> None:
    transport, clock = clocked
    await transport.send(envelope(1), "q", not_before=datetime.now(UTC) + timedelta(hours=1))
    deliveries = Received(transport, "q")
    try:
        assert await deliveries.next_within(PROMPTLY) is None
        clock.advance(timedelta(minutes=59))
        assert await deliveries.next_within(PROMPTLY) is None
        clock.advance(timedelta(minutes=1))
        delivery = await deliveries.next_within(PROMPTLY)  # woken by the advance, not by polling
        assert delivery is not None
        assert delivery.body == b'{"n": 1}'
        await delivery.ack()
    finally:
        await deliveries.stop()


async def test_a_retry_later_waits_on_the_clock(clocked: tuple[MemoryTransport, Clock]) -> None:
    transport, clock = clocked
    await transport.send(envelope(2), "q")
    deliveries = Received(transport, "q")
    try:
        first = await deliveries.next_within(PROMPTLY)
        assert first is not None
        await first.retry_later(600.0, {**first.headers, "tidings-attempt": "2"})
        assert await deliveries.next_within(PROMPTLY) is None
        clock.advance(600.0)
        again = await deliveries.next_within(PROMPTLY)
        assert again is not None
        assert again.headers["tidings-attempt"] == "2"
        await again.ack()
    finally:
        await deliveries.stop()


async def test_time_passes_on_the_clock_by_itself_too(clocked: tuple[MemoryTransport, Clock]) -> None:
    transport, _ = clocked
    await transport.send(envelope(3), "q", not_before=datetime.now(UTC) + timedelta(milliseconds=50))
    deliveries = Received(transport, "q")
    try:
        delivery = await deliveries.next_within(2.0)
        assert delivery is not None
        await delivery.ack()
    finally:
        await deliveries.stop()


def test_a_clock_only_moves_forward() -> None:
    clock = Clock()
    before = clock.now()
    clock.advance(timedelta(seconds=5))
    assert clock.now() - before >= timedelta(seconds=5)
    assert clock.offset == timedelta(seconds=5)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
