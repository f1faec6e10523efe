"""A bus consuming a steady stream from RabbitMQ goes on consuming after every cut of its connection.

Producer and consumer reach the broker through a TCP proxy (tests/tcp_proxy.py) that drops every
connection at once, as a failing network would. The cuts take turns at three moments: while the
consumer's handlers hold deliveries not acknowledged yet (mid-delivery); again and again while the
clients connect anew and their consumers start again (mid-reconnect: a flapping network, the case
that ended the bus's run() before the fix); and while what the broker sends back is held up, so
that publisher confirms are pending when the link goes (mid-confirm). After each cut messages
published after it must be handled (the consumer resumed), and at the end every message the
producer got a confirm for must have been handled at least once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from tests.sizes import size
from tests.tcp_proxy import TcpProxy
from tidings import Bus, Command, Context
from tidings.errors import TransportError

pytestmark = pytest.mark.rabbitmq

#: Seconds the consumer gets to handle a message published after a cut (the issue's bound).
RESUME = 20.0
#: Seconds the stream gets to drain once the producer is done.
DRAIN = 30.0
#: Sends awaiting their confirm at once, and the pause after each burst of that many (~200/s).
WINDOW = 20
PAUSE = 0.1
#: How long a handler holds its delivery unacknowledged: the cuts find deliveries in flight.
HANDLING = 0.01
#: The moments of the cuts, in turn: a delivery in a handler, more cuts soon after the first
#: (while the clients reconnect and their consumers start again), confirms pending.
KINDS = ("mid-delivery", "mid-reconnect", "mid-confirm")
#: Seconds from a new connection to the next cut, in a flapping network's cuts.
FLAP_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.2)
#: Messages handled between resuming after a cut and the next cut.
BETWEEN_CUTS = 60


class Tick(Command, name="reconnect.tick"):
    seq: int


@dataclass
class Stream:
    """What the producer sent and the consumer handled."""

    #: The next sequence number to send: all below it are sent and confirmed, or being sent.
    next_seq: int = 0
    confirmed: set[int] = field(default_factory=set)
    #: Sends that got no confirm (the connection went) and were sent again.
    unconfirmed: int = 0
    handled: set[int] = field(default_factory=set)
    #: The highest sequence number handled so far (-1: none).
    highest: int = -1
    calls: int = 0
    in_flight: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def proxy(rabbitmq_url: str) -> AsyncIterator[TcpProxy]:
    target = urlsplit(rabbitmq_url)
    async with TcpProxy((target.hostname or "127.0.0.1", target.port or 5672)) as proxy:
        yield proxy


def consumer_bus(url: str, stream: Stream) -> Bus:
    bus = Bus("ticks", transport=url, concurrency=8)

    @bus.handle(Tick)
    async def tick(command: Tick, ctx: Context) -> None:
        stream.in_flight += 1
        try:
            await asyncio.sleep(HANDLING)
        finally:
            stream.in_flight -= 1
        stream.calls += 1
        stream.handled.add(command.seq)
        stream.highest = max(stream.highest, command.seq)

    return bus


async def produce(producer: Bus, stream: Stream) -> None:
    """Send Ticks 0, 1, 2, ... until `stream.stop`; each again until it is confirmed (at-least-once)."""
    window = asyncio.Semaphore(WINDOW)

    async def send(seq: int) -> None:
        async with window:
            while True:
                try:
                    await producer.send(Tick(seq=seq))
                except TransportError:
                    # No confirm (the connection went with it), or no connection yet: the port
                    # asks the caller to send again.
                    stream.unconfirmed += 1
                    await asyncio.sleep(0.05)
                    continue
                stream.confirmed.add(seq)
                return

    sending: set[asyncio.Task[None]] = set()
    while not stream.stop.is_set():
        for _ in range(WINDOW):
            task = asyncio.create_task(send(stream.next_seq))
            sending.add(task)
            task.add_done_callback(sending.discard)
            stream.next_seq += 1
        await asyncio.sleep(PAUSE)
    await asyncio.gather(*sending)


async def until(
    condition: Callable[[], bool], what: str, patience: float, running: asyncio.Task[None], stream: Stream
) -> None:
    """Wait for `condition()`; fail saying `what` after `patience` s, or when the bus stopped running."""
    try:
        async with asyncio.timeout(patience):
            while not condition():
                if running.done():
                    raise AssertionError(f"the consumer's run() ended ({running!r}) before {what}")
                await asyncio.sleep(0.02)
    except TimeoutError:
        # Which side stopped: the producer (no confirms), the consumer (no handler calls), both.
        raise AssertionError(
            f"{what}: not within {patience:g} s; sent up to {stream.next_seq}, confirmed up to "
            f"{max(stream.confirmed, default=-1)}, handled up to {stream.highest} "
            f"({stream.calls} calls, {stream.in_flight} in a handler now)"
        ) from None


async def test_a_consumer_resumes_after_every_cut_and_loses_nothing(
    proxy: TcpProxy, rabbitmq_url: str
) -> None:
    url = proxy.rewrite(rabbitmq_url)
    stream = Stream()
    consumer = consumer_bus(url, stream)
    producer = Bus("feeder", transport=url)
    producer.route(Tick, to=consumer.service)
    cuts = size(6, 24)
    async with producer:
        await consumer.start()
        running = asyncio.create_task(consumer.run())
        producing = asyncio.create_task(produce(producer, stream))
        try:
            await until(
                lambda: stream.calls >= BETWEEN_CUTS, "the first messages handled", RESUME, running, stream
            )
            for cut in range(cuts):
                kind = KINDS[cut % len(KINDS)]
                if kind == "mid-confirm":
                    # What the broker sends (the confirms among it) waits in the proxy; publishes
                    # still reach the broker. The cut then loses confirms of stored messages.
                    proxy.downstream_latency = 0.5
                    await asyncio.sleep(0.3)
                else:
                    await until(
                        lambda: stream.in_flight > 0, "a delivery in a handler", RESUME, running, stream
                    )
                links = proxy.live
                published_before = stream.next_seq
                proxy.cut()
                proxy.downstream_latency = 0.0
                assert links > 0, "the cut dropped no connection"
                if kind == "mid-reconnect":
                    # Again and again while the clients connect anew, restore their channels and
                    # start consuming again: a network that flaps. The delays spread the cuts
                    # over the steps of a reconnection, whatever this machine's speed.
                    for delay in FLAP_DELAYS:
                        connections = proxy.connections
                        await until(
                            lambda n=connections: proxy.connections > n,  # type: ignore[misc]
                            "a new connection after the cut",
                            RESUME,
                            running,
                            stream,
                        )
                        await asyncio.sleep(delay)
                        proxy.cut()
                await until(
                    lambda before=published_before: stream.highest >= before,  # type: ignore[misc]
                    f"cut {cut + 1} ({kind}): a message published after it handled",
                    RESUME,
                    running,
                    stream,
                )
                calls = stream.calls
                await until(
                    lambda calls=calls: stream.calls >= calls + BETWEEN_CUTS,  # type: ignore[misc]
                    f"cut {cut + 1} ({kind}): the stream flowing again",
                    RESUME,
                    running,
                    stream,
                )
            stream.stop.set()
            await producing
            await until(
                lambda: stream.confirmed <= stream.handled,
                "every confirmed message handled",
                DRAIN,
                running,
                stream,
            )
        finally:
            stream.stop.set()
            producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
            consumer.stop()
            await asyncio.gather(running, return_exceptions=True)
            await consumer.close()
    lost = stream.confirmed - stream.handled
    assert not lost, f"{len(lost)} confirmed messages never handled, e.g. {sorted(lost)[:10]}"
    assert stream.confirmed == set(range(stream.next_seq))
    assert consumer.stats.dead_lettered == 0
    assert proxy.connections > 2 * cuts  # each cut made producer and consumer connect again
    print(
        f"\n{cuts} cuts, {stream.next_seq} messages, {stream.calls - len(stream.handled)} handled twice, "
        f"{stream.unconfirmed} sent again"
    )
