"""A node of a 3-node cluster dies under a stream of messages, and not one is lost (issue 16).

A producer publishes events, half of them plainly (published again after a `PublishNotConfirmed`)
and half through its outbox, while two instances of a consuming service with an inbox handle them
into an effects table; both services reach the cluster through one URL listing its three nodes, in
different orders. A fifth of the way in, the node leading the consumer's quorum queue is SIGKILLed
(or stopped with `stop_app`, or killed, brought back and another leader killed), then brought back.
Each test prints its figures (the ones in docs/guarantees.md) and asserts: every message's effect
exactly once, and publishing and consuming going again within RESUME seconds of the disruption.

`scripts/test` runs the single kill with 2,000 messages on the machine's RabbitMQ; `--full` runs
every disruption with 20,000 messages, on RabbitMQ 4 as well (tests/sizes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from tests.cluster.local_cluster import Cluster, cluster, vhost
from tests.conftest import POSTGRES_HOST, require_server
from tests.sizes import FULL, size
from tests.storage.databases import domain, effects, postgres_engine
from tidings import Bus, Context, Envelope, Event
from tidings.errors import PublishNotConfirmed, TransportError
from tidings.storage import outbox_table

__all__ = ["cluster", "vhost"]

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = size(2_000, 20_000)
#: Database connections the producer and both consumers share.
POOL = 8
#: The issue's figure: publishing and consuming work again this soon after a node is lost.
RESUME = 30.0
#: Messages a second the producer offers: the stream must still flow when the node dies.
RATE = size(500, 1_000)


class Credited(Event, name="cluster.credited"):
    seq: int


@dataclass
class Figures:
    messages: int
    lost: int
    wire_duplicates: int
    effect_duplicates: int
    seconds_to_resume: float

    def __str__(self) -> str:
        return (
            f"messages {self.messages}, lost {self.lost}, wire duplicates {self.wire_duplicates}, "
            f"effect duplicates {self.effect_duplicates}, seconds to resume {self.seconds_to_resume:.1f}"
        )


@pytest.fixture
async def database() -> AsyncIterator[AsyncEngine]:
    """The test PostgreSQL database, seen through a schema of this test's own."""
    require_server("PostgreSQL", POSTGRES_HOST)
    schema = f"cluster_{uuid.uuid4().hex[:8]}"
    # A fixed pool, opened at once: the test database is shared with other runs, and a
    # connection refused there ("too many clients") is not what this test is about.
    engine = postgres_engine(schema, pool_size=POOL, max_overflow=0, pool_timeout=120)
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA {schema}"))
        await connection.run_sync(domain.create_all, tables=[effects])
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(POOL):
            await stack.enter_async_context(engine.connect())
    try:
        yield engine
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()


class Stream:
    """The producer, the two consumer instances, and what they have done so far."""

    def __init__(self, cluster: Cluster, vhost: str, database: AsyncEngine) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.database = database
        self.sessions = async_sessionmaker(database)
        self.published = 0  # plain publishes confirmed, and outbox transactions committed
        self.handled = 0  # effects written
        self.not_confirmed = 0
        self.producer = Bus(f"producer-{suffix}", cluster.url(vhost, (1, 2, 3)), database=database)
        self.consumers = [
            Bus(f"ledger-{suffix}", cluster.url(vhost, order), database=database, concurrency=3)
            for order in ((1, 2, 3), (2, 3, 1))
        ]
        for consumer in self.consumers:
            consumer.subscribe(Credited)(self._credit)

    async def _credit(self, event: Credited, ctx: Context) -> None:
        assert ctx.session is not None
        await ctx.session.execute(insert(effects).values(seq=event.seq, message_id=ctx.envelope.id))
        self.handled += 1

    async def _publish(self, seq: int) -> None:
        # A plain publish that was not confirmed goes again as the same message (the port's
        # contract: the caller publishes it again), so the inbox knows the copy by its id.
        plain = Envelope(type="cluster.credited", source=self.producer.service,
                         body=Credited(seq=seq).model_dump_json().encode())  # fmt: skip
        while True:
            try:
                if seq % 2:
                    await self.producer.transport.publish(plain)
                else:
                    async with self.sessions.begin() as session:
                        await self.producer.publish(Credited(seq=seq), session=session)
                self.published += 1
                return
            except (PublishNotConfirmed, TransportError, DBAPIError):
                # Maybe stored: at-least-once asks the caller to publish again (the inbox drops
                # the copy). A publish while no node answers fails the same way, after a wait.
                self.not_confirmed += 1
                await asyncio.sleep(0.2)

    async def produce(self) -> None:
        window = asyncio.Semaphore(100)

        async def one(seq: int) -> None:
            async with window:
                await self._publish(seq)

        tasks = []
        for seq in range(MESSAGES):
            tasks.append(asyncio.create_task(one(seq)))
            if seq % 25 == 24:
                await asyncio.sleep(25 / RATE)
        await asyncio.gather(*tasks)

    async def outcome(self) -> tuple[int, int, int]:
        """Distinct messages with an effect, effect rows, outbox rows not yet sent."""
        async with self.database.connect() as connection:
            distinct = await connection.scalar(select(func.count(func.distinct(effects.c.seq))))
            rows = await connection.scalar(select(func.count()).select_from(effects))
            unsent = await connection.scalar(
                select(func.count()).select_from(outbox_table).where(outbox_table.c.sent_at.is_(None))
            )
        return int(distinct or 0), int(rows or 0), int(unsent or 0)


async def until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


async def resumed(stream: Stream, since: float) -> float:
    """Seconds from `since` until publishing and consuming both made headway again."""
    published, handled = stream.published, stream.handled
    await until(
        lambda: (
            (stream.published >= min(published + 50, MESSAGES) and stream.handled >= handled + 50)
            or stream.handled >= MESSAGES
        ),
        "publishing and consuming resume",
        timeout=120,
    )
    return time.monotonic() - since


async def run_stream(
    cluster: Cluster, vhost: str, database: AsyncEngine, disrupt: Callable[[Stream], Awaitable[float]]
) -> Figures:
    """Stream MESSAGES through the cluster, `disrupt` it a fifth of the way in; the figures."""
    stream = Stream(cluster, vhost, database)
    await stream.producer.create_tables()
    buses = [*stream.consumers, stream.producer]  # the first consumer declares the queue: on node 1
    for bus in buses:
        await bus.start()
    runs = [asyncio.create_task(bus.run()) for bus in buses]
    producing = asyncio.create_task(stream.produce())
    try:
        await until(lambda: stream.handled >= MESSAGES // 5, "a fifth of the stream handled", timeout=180)
        seconds = await disrupt(stream)
        await asyncio.wait_for(asyncio.shield(producing), timeout=600)
        try:
            await until(lambda: stream.handled >= MESSAGES, "every message handled", timeout=300)
        except AssertionError as missing:
            # What the consumers counted says where the rest went (a dead letter, a message that
            # keeps going back): seen once in CI, a message dead-lettered for its delivery count.
            counted = "; ".join(f"{bus.service}: {bus.stats}" for bus in stream.consumers)
            raise AssertionError(f"{missing}: handled {stream.handled} of {MESSAGES}; {counted}") from None
        # Copies still on their way (a publish repeated after a lost confirm) land in the inbox.
        distinct, rows, unsent = await stream.outcome()
        for _ in range(40):
            if unsent == 0:
                break
            await asyncio.sleep(0.5)
            distinct, rows, unsent = await stream.outcome()
        await asyncio.sleep(2)
        distinct, rows, unsent = await stream.outcome()
    finally:
        producing.cancel()
        for bus in buses:
            bus.stop()
        await asyncio.gather(producing, *runs, return_exceptions=True)
        for bus in buses:
            await bus.close()
    figures = Figures(
        messages=MESSAGES,
        lost=MESSAGES - distinct,
        wire_duplicates=sum(bus.stats.duplicates for bus in stream.consumers),
        effect_duplicates=rows - distinct,
        seconds_to_resume=seconds,
    )
    print(f"\n{cluster.version} cluster, {figures} (publishes not confirmed: {stream.not_confirmed})")
    assert unsent == 0
    return figures


def assert_nothing_lost(figures: Figures) -> None:
    assert (figures.lost, figures.effect_duplicates) == (0, 0), figures
    # Printed, and asserted generously: the figure is the bound, not a measure of speed.
    assert figures.seconds_to_resume <= RESUME, figures


async def kill_leader(
    cluster: Cluster, vhost: str, stream: Stream, *, graceful: bool = False, killed: list[int] | None = None
) -> float:
    """Kill (or `stop_app`) the node leading the consumers' queue, then bring it back; seconds
    from the disruption until publishing and consuming resumed. The node goes into `killed`."""
    queue = stream.consumers[0].transport.topology.queue(stream.consumers[0].queue)  # type: ignore[attr-defined]
    leader = await asyncio.to_thread(cluster.leader, vhost, queue)
    print(f"\n{queue} is led by node {leader}: {'stop_app' if graceful else 'SIGKILL'}")
    if killed is not None:
        killed.append(leader)
    since = time.monotonic()
    if graceful:
        await asyncio.to_thread(cluster.ctl, leader, "stop_app")
    else:
        await asyncio.to_thread(cluster.run, "kill", str(leader))
    seconds = await resumed(stream, since)
    if graceful:
        await asyncio.to_thread(cluster.ctl, leader, "start_app")
    else:
        await asyncio.to_thread(cluster.run, "restart", str(leader))
    return seconds


async def test_the_leader_of_the_queue_killed_loses_nothing(
    cluster: Cluster, vhost: str, database: AsyncEngine
) -> None:
    async def disrupt(stream: Stream) -> float:
        return await kill_leader(cluster, vhost, stream)

    assert_nothing_lost(await run_stream(cluster, vhost, database, disrupt))


@pytest.mark.skipif(not FULL, reason="full sizes only (scripts/test --full)")
async def test_the_leader_stopped_gracefully_loses_nothing(
    cluster: Cluster, vhost: str, database: AsyncEngine
) -> None:
    async def disrupt(stream: Stream) -> float:
        return await kill_leader(cluster, vhost, stream, graceful=True)

    assert_nothing_lost(await run_stream(cluster, vhost, database, disrupt))


@pytest.mark.skipif(not FULL, reason="full sizes only (scripts/test --full)")
async def test_two_kills_in_a_row_of_different_nodes_lose_nothing(
    cluster: Cluster, vhost: str, database: AsyncEngine
) -> None:
    async def disrupt(stream: Stream) -> float:
        killed: list[int] = []
        first = await kill_leader(cluster, vhost, stream, killed=killed)  # back before the second
        handled = stream.handled
        await until(lambda: stream.handled >= min(handled + MESSAGES // 10, MESSAGES), "headway", 120)
        second = await kill_leader(cluster, vhost, stream, killed=killed)
        assert killed[0] != killed[1], killed  # the new leader, elected when the first died
        return max(first, second)

    assert_nothing_lost(await run_stream(cluster, vhost, database, disrupt))
