"""The relay through reconnects, outages and long rounds: a subject's order holds, no row goes twice.

A publish that was not confirmed because the connection went (or the confirm timed out) is an
outage, not a refusal: its chain stops there and the row goes again first, in order. An outage
backs off and is counted and logged once. A round longer than the claim timeout renews its lease,
so a second relay never ships the same rows beside it; a relay that loses its lease stops shipping.

The RabbitMQ tests put `tests.tcp_proxy.TcpProxy` between the relay and the broker, to cut the
connection mid-chain or slow every publish down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.conftest import RABBITMQ_HOST
from tests.helpers import eventually
from tests.storage.messages import Deposited
from tests.tcp_proxy import TcpProxy
from tidings import Bus, Envelope, PublishNotConfirmed, TransportError
from tidings.errors import PublishRefused
from tidings.outbox import OutboxSettings
from tidings.relay import MAX_OUTAGE_BACKOFF, OUTAGE_BACKOFF, Relay, outage_delay
from tidings.storage import outbox_table
from tidings.transports.memory import MemoryTransport
from tidings.transports.rabbitmq import RabbitMQTransport

# -- helpers -------------------------------------------------------------------------------------


class Scripted(MemoryTransport):
    """Records the seq of each event shipped; `fail` decides, per attempt, whether it raises."""

    def __init__(self, *, pause: float = 0.0) -> None:
        super().__init__()
        self.pause = pause
        self.shipped: list[int] = []
        self.attempts: list[tuple[float, int]] = []  # (loop time, seq)
        self.failing: dict[int, list[BaseException]] = defaultdict(list)  # seq -> errors to raise

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        seq = int(json.loads(envelope.body)["seq"])
        self.attempts.append((asyncio.get_running_loop().time(), seq))
        if self.pause:
            await asyncio.sleep(self.pause)  # a broker round trip
        if self.failing[seq]:
            raise self.failing[seq].pop(0)
        self.shipped.append(seq)


def first_occurrences(seqs: Sequence[int]) -> list[int]:
    seen: set[int] = set()
    return [seq for seq in seqs if not (seq in seen or seen.add(seq))]  # type: ignore[func-returns-value]


async def write_chain(bus: Bus, engine: AsyncEngine, count: int, *, subject: str = "s") -> None:
    """`count` events of one subject, one transaction each, seq 0..count-1 in id order."""
    for seq in range(count):
        async with AsyncSession(engine) as session, session.begin():
            await bus.publish(Deposited(account=subject, seq=seq), session=session, subject=subject)


async def make_due(engine: AsyncEngine) -> None:
    """Time passes: refused rows come due (the leases of live relays are left alone)."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    async with engine.begin() as connection:
        await connection.execute(
            update(outbox_table).where(outbox_table.c.sent_at.is_(None)).values(next_attempt_at=past)
        )


def relay_of(bus: Bus) -> Relay:
    assert bus.relay is not None
    return bus.relay


# -- without a broker: the rules ---------------------------------------------------------------


async def test_a_publish_lost_with_the_connection_holds_its_chain_and_goes_again_in_order(
    database: AsyncEngine,
) -> None:
    transport = Scripted()
    bus = Bus("producer", transport=transport, database=database)
    await write_chain(bus, database, 5)
    transport.failing[2].append(PublishNotConfirmed("connection lost before the confirm"))
    relay = relay_of(bus)
    async with bus:
        for _ in range(10):
            with contextlib.suppress(TransportError):
                await relay.relay_once()
            await make_due(database)  # even a refused row's backoff would be over
            if len(set(transport.shipped)) == 5:
                break
    assert first_occurrences(transport.shipped) == [0, 1, 2, 3, 4]
    # 3 and 4 were not tried before 2 was confirmed: the chain waited at 2.
    tried = [seq for _, seq in transport.attempts]
    assert tried == [0, 1, 2, 2, 3, 4]
    assert relay.stats.refused == 0


async def test_a_message_the_broker_refuses_lets_its_chain_go_on(database: AsyncEngine) -> None:
    transport = Scripted()
    bus = Bus("producer", transport=transport, database=database)
    await write_chain(bus, database, 3)
    transport.failing[1].append(PublishRefused("RabbitMQ refused a message (a nack)"))
    relay = relay_of(bus)
    async with bus:
        assert await relay.relay_once() == 3
    assert transport.shipped == [0, 2]  # a verdict on that one message: the rows behind it go on
    assert relay.stats.refused == 1
    assert relay.stats.last_error is not None
    assert "PublishRefused" in relay.stats.last_error


def test_the_outage_backoff_doubles_up_to_its_cap() -> None:
    delays = [outage_delay(failures) for failures in range(1, 12)]
    assert delays[:4] == [OUTAGE_BACKOFF, OUTAGE_BACKOFF * 2, OUTAGE_BACKOFF * 4, OUTAGE_BACKOFF * 8]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_OUTAGE_BACKOFF
    assert outage_delay(10_000) == MAX_OUTAGE_BACKOFF


async def test_an_outage_backs_off_and_is_counted_and_logged_once(
    database: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    transport = Scripted()
    bus = Bus("producer", transport=transport, database=database)
    await write_chain(bus, database, 3)
    transport.failing[0].extend(PublishNotConfirmed(f"connection lost ({n})") for n in range(3))
    relay = relay_of(bus)
    caplog.set_level(logging.INFO, logger="tidings.relay")
    async with bus:
        running = asyncio.create_task(relay.run())
        try:
            await eventually(lambda: len(transport.shipped) == 3, timeout=20)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert transport.shipped == [0, 1, 2]
    times = [moment for moment, seq in transport.attempts if seq == 0]
    assert len(times) == 4  # three failures, then the confirm
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each wait at least twice the one before (0.5 s, 1 s, 2 s): lower bounds only, never flaky.
    for gap, least in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert gap >= least * 0.9, gaps
    assert relay.stats.outages == 1  # one outage, however many rounds it lasted
    assert relay.stats.refused == 0
    warnings = [
        record
        for record in caplog.records
        if record.name == "tidings.relay" and record.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    assert "connection lost (0)" in warnings[0].getMessage()
    assert warnings[0].__dict__["service"] == "producer"  # a field of every record of the relay


async def test_a_round_longer_than_the_claim_timeout_keeps_its_rows_from_a_second_relay(
    database: AsyncEngine,
) -> None:
    settings = OutboxSettings(claim_timeout=1.0, batch_size=10)
    transports = [Scripted(pause=0.15), Scripted(pause=0.15)]  # a round of 10 rows takes 1.5 s
    first, second = (
        Bus("producer", transport=t, database=database, outbox_settings=settings) for t in transports
    )
    await write_chain(first, database, 10)
    async with first, second:
        shipping = asyncio.create_task(relay_of(first).relay_once())
        await asyncio.sleep(1.2)  # past the first relay's original lease
        await relay_of(second).relay_once()
        await shipping
    assert transports[0].shipped == list(range(10))
    assert transports[1].shipped == []  # nothing leased was taken
    async with database.connect() as connection:
        unsent = (
            await connection.execute(select(outbox_table.c.id).where(outbox_table.c.sent_at.is_(None)))
        ).all()
    assert unsent == []


async def test_a_relay_that_loses_its_lease_stops_shipping_that_round(database: AsyncEngine) -> None:
    settings = OutboxSettings(claim_timeout=0.6, batch_size=10)
    transport = Scripted(pause=0.1)
    bus = Bus("producer", transport=transport, database=database, outbox_settings=settings)
    await write_chain(bus, database, 10)
    relay = relay_of(bus)
    async with bus:
        shipping = asyncio.create_task(relay.relay_once())
        await eventually(lambda: len(transport.shipped) >= 2)
        async with database.begin() as connection:  # another relay took the rows (a lease gone)
            await connection.execute(update(outbox_table).values(claimed_by="thief"))
        await shipping
    assert 2 <= len(transport.shipped) < 10
    assert relay.stats.leases_lost == 1
    assert transport.shipped == list(range(len(transport.shipped)))
    unsent = select(outbox_table.c.claimed_by).where(outbox_table.c.sent_at.is_(None))
    async with database.connect() as connection:
        left: list[str | None] = list((await connection.execute(unsent)).scalars())
    assert left
    assert set(left) == {"thief"}  # its rows are left to the relay that holds them


# -- on RabbitMQ, through a proxy ----------------------------------------------------------------

SUBJECTS = 6
PER_TRANSACTION = 5
TRANSACTIONS = 60  # 300 rows


@contextlib.asynccontextmanager
async def proxied(rabbitmq_url: str, *, upstream_latency: float) -> AsyncIterator[tuple[TcpProxy, str]]:
    async with TcpProxy(RABBITMQ_HOST) as proxy:
        proxy.upstream_latency = upstream_latency
        yield proxy, proxy.rewrite(rabbitmq_url) + "&reconnect_interval=0.2&publish_timeout=5"


@contextlib.asynccontextmanager
async def recording(rabbitmq_url: str, arrivals: dict[str, list[int]]) -> AsyncIterator[None]:
    """A consumer straight on the broker (never cut), recording each subject's seqs as they come."""
    async with RabbitMQTransport.from_url(rabbitmq_url) as consumer:
        await consumer.declare_queue("ledger")
        await consumer.bind("ledger", Deposited.wire_name)

        async def consume() -> None:
            async for delivery in consumer.receive("ledger", prefetch=100):
                event = json.loads(delivery.body)
                arrivals[event["account"]].append(int(event["seq"]))
                await delivery.ack()

        task = asyncio.create_task(consume())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def assert_in_order(arrivals: dict[str, list[int]], expected: dict[str, int]) -> None:
    """Per subject: first occurrences in seq order, none missing (copies allowed: at least once)."""
    for subject, count in expected.items():
        assert first_occurrences(arrivals[subject]) == list(range(count)), (subject, arrivals[subject])


@pytest.mark.rabbitmq
async def test_a_subject_keeps_its_order_when_the_connection_is_cut_mid_chain(
    database: AsyncEngine, rabbitmq_url: str
) -> None:
    arrivals: dict[str, list[int]] = defaultdict(list)
    # 10 ms on the way to the broker: at any moment a publish is likely on the wire, unconfirmed,
    # and a cut loses it.
    async with (
        proxied(rabbitmq_url, upstream_latency=0.01) as (proxy, url),
        recording(rabbitmq_url, arrivals),
    ):
        bus = Bus("producer", transport=url, database=database)
        counts: dict[str, int] = defaultdict(int)
        for transaction in range(TRANSACTIONS):
            subject = f"s{transaction % SUBJECTS}"
            async with AsyncSession(database) as session, session.begin():
                for _ in range(PER_TRANSACTION):
                    event = Deposited(account=subject, seq=counts[subject])
                    await bus.publish(event, session=session, subject=subject)
                    counts[subject] += 1
        total = TRANSACTIONS * PER_TRANSACTION

        def received() -> int:
            return sum(len(set(seqs)) for seqs in arrivals.values())

        async with bus:
            relay = relay_of(bus)
            running = asyncio.create_task(relay.run())
            try:
                for share in (0.2, 0.45, 0.7):  # three cuts, mid-chain
                    await eventually(lambda share=share: received() >= total * share, timeout=20)  # type: ignore[misc]
                    proxy.cut()
                await eventually(lambda: received() == total, timeout=25)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
    assert_in_order(arrivals, counts)
    assert relay.stats.outages >= 1  # the cuts were seen, as outages
    assert relay.stats.refused == 0


@pytest.mark.rabbitmq
async def test_two_relays_and_rounds_longer_than_the_claim_timeout_ship_each_row_once_in_order(
    database: AsyncEngine, rabbitmq_url: str
) -> None:
    arrivals: dict[str, list[int]] = defaultdict(list)
    # 40 ms a publish, 30 rows a round: 1.2 s and more, past the 1 s lease.
    settings = OutboxSettings(claim_timeout=1.0, batch_size=30, poll_interval=0.05)
    async with (
        proxied(rabbitmq_url, upstream_latency=0.04) as (_proxy, url),
        recording(rabbitmq_url, arrivals),
    ):
        relays = [
            Bus("producer", transport=url, database=database, outbox_settings=settings) for _ in range(2)
        ]
        await write_chain(relays[0], database, 60)
        async with relays[0], relays[1]:
            running = [asyncio.create_task(relay_of(bus).run()) for bus in relays]
            try:
                await eventually(lambda: len(set(arrivals["s"])) == 60, timeout=25)
                await asyncio.sleep(0.5)  # a late copy would show up by now
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
    assert arrivals["s"] == list(range(60))  # in order, and each once: no lease ran out
    assert sum(relay_of(bus).stats.sent for bus in relays) == 60
