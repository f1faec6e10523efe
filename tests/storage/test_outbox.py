"""The outbox: written in the caller's transaction, shipped by the relay after the commit."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tests.helpers import eventually, running
from tests.storage.messages import Credit, Deposited
from tidings import Bus, ConfigurationError, Context, Envelope, TransportError
from tidings.outbox import Outbox, OutboxSettings
from tidings.storage import as_utc, outbox_table
from tidings.transports.memory import MemoryTransport

# A relay that only polls would wait an hour: these tests pass only if a commit wakes it.
NO_POLLING = OutboxSettings(poll_interval=3600)


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


async def count_rows(engine: AsyncEngine, *conditions: object) -> int:
    async with engine.connect() as connection:
        query = select(func.count()).select_from(outbox_table).where(*conditions)  # type: ignore[arg-type]
        return int((await connection.execute(query)).scalar_one())


def consumer_of(url: str, received: list[Deposited]) -> Bus:
    consumer = Bus("consumer", transport=url)

    @consumer.subscribe(Deposited)
    async def record(event: Deposited, ctx: Context) -> None:
        received.append(event)

    return consumer


async def test_a_committed_publish_is_delivered_at_once_a_rolled_back_one_never(
    database: AsyncEngine,
) -> None:
    url = memory_url()
    producer = Bus("producer", transport=url, database=database, outbox_settings=NO_POLLING)
    received: list[Deposited] = []
    async with running(consumer_of(url, received), producer):
        relay = producer.relay  # type: ignore[union-attr]
        await eventually(lambda: relay.stats.rounds >= 1)  # then it waits for a wake-up only
        async with AsyncSession(database) as session:
            async with session.begin():
                await producer.publish(Deposited(account="a", seq=1), session=session)
                await session.rollback()
            async with session.begin():
                await producer.publish(Deposited(account="a", seq=2), session=session)
        await eventually(lambda: len(received) >= 1)
    # Shipped in id order: had the rolled-back row existed, it would have come first.
    assert [event.seq for event in received] == [2]
    assert await count_rows(database) == 1


async def test_the_row_holds_the_whole_envelope_and_where_it_goes(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    bus.route(Credit, to="accounts")
    later = datetime.now(UTC) + timedelta(hours=1)
    async with AsyncSession(database) as session, session.begin():
        await bus.publish(
            Deposited(account="a", seq=1), session=session, subject="a", headers={"x-user": "u1"}
        )
        await bus.send(Credit(account="a", seq=2), session=session, at=later)
    async with database.connect() as connection:
        rows = (await connection.execute(select(outbox_table).order_by(outbox_table.c.id))).all()
    published, sent = rows
    headers = json.loads(published.headers)
    envelope = Envelope.from_headers(headers, published.body)
    assert envelope.type == "storage-test.deposited"
    assert envelope.subject == "a"
    assert envelope.headers["x-user"] == "u1"
    assert envelope.id == published.message_id
    assert json.loads(published.body) == {"account": "a", "seq": 1}
    assert published.queue is None
    assert published.not_before is None
    assert sent.queue == "accounts"
    assert as_utc(sent.not_before) == later
    assert published.transaction_key == sent.transaction_key  # one transaction: kept in order
    assert published.sent_at is None
    assert published.attempts == 0


async def test_each_transaction_gets_its_own_key(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    async with AsyncSession(database) as session:
        for seq in (1, 2):
            async with session.begin():
                await bus.publish(Deposited(account="a", seq=seq), session=session)
    async with database.connect() as connection:
        keys = (await connection.execute(select(outbox_table.c.transaction_key))).scalars().all()
    assert len(set(keys)) == 2


async def test_a_session_without_a_transaction_is_refused_and_nothing_written(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    async with AsyncSession(database) as session:
        with pytest.raises(ConfigurationError, match="transaction in progress"):
            await bus.publish(Deposited(account="a", seq=1), session=session)
        await session.commit()
    assert await count_rows(database) == 0


async def test_a_session_of_another_engine_is_refused_and_nothing_written(
    database: AsyncEngine, tmp_path: object
) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    other = create_async_engine("sqlite+aiosqlite://")
    try:
        async with AsyncSession(other) as session, session.begin():
            with pytest.raises(ConfigurationError, match="not to the bus's database"):
                await bus.publish(Deposited(account="a", seq=1), session=session)
    finally:
        await other.dispose()
    assert await count_rows(database) == 0


async def test_session_must_be_an_async_session(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    async with database.begin() as connection:
        with pytest.raises(ConfigurationError, match="AsyncSession"):
            await bus.publish(Deposited(account="a", seq=1), session=connection)


async def test_session_needs_a_bus_with_a_database(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url())
    async with AsyncSession(database) as session, session.begin():
        with pytest.raises(ConfigurationError, match="needs a bus with a database"):
            await bus.publish(Deposited(account="a", seq=1), session=session)


async def test_rows_written_in_a_released_savepoint_commit_with_the_transaction(
    database: AsyncEngine,
) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    async with AsyncSession(database) as session, session.begin():
        async with session.begin_nested():
            await bus.publish(Deposited(account="a", seq=1), session=session)
        savepoint = await session.begin_nested()
        await bus.publish(Deposited(account="a", seq=2), session=session)
        await savepoint.rollback()
    async with database.connect() as connection:
        bodies = (await connection.execute(select(outbox_table.c.body))).scalars().all()
    assert [json.loads(body)["seq"] for body in bodies] == [1]


async def test_a_refused_row_is_kept_counted_and_does_not_block_the_rows_behind_it(
    database: AsyncEngine,
) -> None:
    url = memory_url()
    bus = Bus("producer", transport=url, database=database)
    bus.route(Credit, to="nowhere")  # never declared: the transport says NoRoute
    received: list[Deposited] = []
    async with running(consumer_of(url, received)), bus:
        async with AsyncSession(database) as session, session.begin():
            await bus.send(Credit(account="a", seq=1), session=session, subject="a")
            await bus.publish(Deposited(account="a", seq=2), session=session, subject="a")
        relay = bus.relay  # type: ignore[union-attr]
        assert await relay.relay_once() == 2
        await eventually(lambda: len(received) == 1)
    assert relay.stats.sent == 1
    assert relay.stats.refused == 1
    assert relay.stats.last_error is not None
    assert "NoRoute" in relay.stats.last_error
    async with database.connect() as connection:
        refused = (
            await connection.execute(select(outbox_table).where(outbox_table.c.queue == "nowhere"))
        ).one()
    assert refused.sent_at is None
    assert refused.attempts == 1
    assert "NoRoute" in refused.last_error
    assert refused.next_attempt_at is not None
    assert refused.claimed_by is None


async def test_a_transport_outage_leaves_the_rows_for_later(database: AsyncEngine) -> None:
    url = memory_url()
    bus = Bus("producer", transport=url, database=database)
    async with bus:
        async with AsyncSession(database) as session, session.begin():
            for seq in range(3):
                await bus.publish(Deposited(account="a", seq=seq), session=session)
        relay = bus.relay  # type: ignore[union-attr]
        original = MemoryTransport.publish

        async def broker_down(*args: object, **kwargs: object) -> None:
            raise TransportError("broker down")

        bus.transport.publish = broker_down  # type: ignore[method-assign]
        with pytest.raises(TransportError):
            await relay.relay_once()
        assert await count_rows(database, outbox_table.c.claimed_by.is_not(None)) == 0
        assert await count_rows(database, outbox_table.c.sent_at.is_(None)) == 3
        bus.transport.publish = original.__get__(bus.transport)  # type: ignore[method-assign]
        assert await relay.relay_once() == 3
    assert await count_rows(database, outbox_table.c.sent_at.is_not(None)) == 3
    assert relay.stats.refused == 0


async def test_sent_rows_are_deleted_after_the_retention_in_bounded_batches(database: AsyncEngine) -> None:
    settings = OutboxSettings(retention=timedelta(minutes=5), cleanup_batch_size=2)
    bus = Bus("producer", transport=memory_url(), database=database, outbox_settings=settings)
    async with bus:
        async with AsyncSession(database) as session, session.begin():
            for seq in range(7):
                await bus.publish(Deposited(account="a", seq=seq), session=session)
        relay = bus.relay  # type: ignore[union-attr]
        await relay.relay_once()
        # Five rows were sent long ago, two just now (inside the retention period).
        async with database.begin() as connection:
            old = datetime.now(UTC) - timedelta(minutes=10)
            ids = (await connection.execute(select(outbox_table.c.id).order_by(outbox_table.c.id))).scalars()
            await connection.execute(
                update(outbox_table).where(outbox_table.c.id.in_(list(ids)[:5])).values(sent_at=old)
            )
        assert await relay.clean_up() == 5
    assert relay.stats.deleted == 5
    assert await count_rows(database) == 2


async def test_another_services_rows_are_not_shipped(database: AsyncEngine) -> None:
    url = memory_url()
    mine = Bus("producer", transport=url, database=database)
    theirs = Bus("other", transport=url, database=database)
    async with mine, AsyncSession(database) as session:
        async with session.begin():
            await theirs.publish(Deposited(account="a", seq=1), session=session)
        assert await mine.relay.relay_once() == 0  # type: ignore[union-attr]
    assert await count_rows(database, outbox_table.c.service == "other") == 1


async def test_the_database_being_down_is_unavailable_not_a_crash() -> None:
    from tidings import Unavailable

    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    bus = Bus("producer", transport=memory_url(), database=engine)
    try:
        async with bus:
            with pytest.raises(Unavailable, match="database unavailable"):
                await bus.relay.relay_once()  # type: ignore[union-attr]
    finally:
        await engine.dispose()


async def test_schema_round_trip_keeps_create_tables_idempotent(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    await bus.create_tables()
    await bus.create_tables()
    async with database.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM tidings_inbox"))).scalar_one() == 0


async def test_a_time_with_an_offset_is_stored_as_the_same_instant(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database)
    bus.route(Credit, to="accounts")
    later = datetime(2031, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with AsyncSession(database) as session, session.begin():
        await bus.send(Credit(account="a", seq=1), session=session, at=later)
        with pytest.raises(ConfigurationError, match="aware"):
            await bus.publish(Deposited(account="a", seq=2), session=session, at=datetime(2031, 5, 1))
    async with database.connect() as connection:
        stored = (await connection.execute(select(outbox_table.c.not_before))).scalar_one()
    assert as_utc(stored) == later


async def test_a_bus_stopping_mid_round_lets_the_relay_finish_it(database: AsyncEngine) -> None:
    """Stopping must not leave rows leased to a relay that is gone (they would wait a claim timeout)."""
    # No heartbeats: the transport's publish below counts what the relay ships.
    bus = Bus("producer", transport=memory_url(), database=database, heartbeat_interval=None)
    shipped: list[str] = []
    first_shipped = asyncio.Event()

    async def slow_publish(envelope: Envelope, *, not_before: object = None) -> None:
        await asyncio.sleep(0.05)  # a broker round trip
        shipped.append(envelope.id)
        first_shipped.set()

    bus.transport.publish = slow_publish  # type: ignore[method-assign]
    async with AsyncSession(database) as session, session.begin():
        for seq in range(5):  # one transaction: one chain, shipped one after the other
            await bus.publish(Deposited(account="a", seq=seq), session=session)
    async with bus:
        running_bus = asyncio.create_task(bus.run())
        await first_shipped.wait()
        bus.stop()
        await running_bus
    assert len(shipped) == 5  # the round went on to its end
    assert await count_rows(database, outbox_table.c.claimed_by.is_not(None)) == 0
    assert await count_rows(database, outbox_table.c.sent_at.is_not(None)) == 5


async def test_waiting_for_work_ends_when_cancelled_as_a_commit_wakes_it(database: AsyncEngine) -> None:
    """The cancel and the wake in one turn of the loop: Python 3.11's `asyncio.wait_for` returned
    normally there, and the cancellation was lost (a stopping bus then waited for its relay)."""
    outbox = Outbox("producer", database, NO_POLLING)
    waiting = asyncio.create_task(outbox.wait_for_work(NO_POLLING.poll_interval))
    await asyncio.sleep(0)  # it waits on the wake
    outbox.wake()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_relay_cancelled_as_a_commit_wakes_it_ends_instead_of_going_on(database: AsyncEngine) -> None:
    bus = Bus("producer", transport=memory_url(), database=database, outbox_settings=NO_POLLING)
    relay, outbox = bus.relay, bus.outbox
    assert relay is not None
    assert outbox is not None
    async with bus:
        relaying = asyncio.create_task(relay.run())
        # Its first round (and clean-up) done, it waits for a commit to wake it.
        await eventually(lambda: relay.stats.rounds == 1 and bool(outbox._wake._waiters))
        outbox.wake()  # a handler's commit, as Bus.run() cancels its storage tasks
        relaying.cancel()
        another_round = asyncio.create_task(eventually(lambda: relay.stats.rounds > 1))
        try:
            await asyncio.wait({relaying, another_round}, return_when=asyncio.FIRST_COMPLETED)
            assert relaying.done(), "the relay took its cancellation for a wake and went on"
            assert relaying.cancelled()
        finally:
            for task in (another_round, relaying):  # a relay that went on is stopped here
                task.cancel()
            await asyncio.gather(another_round, relaying, return_exceptions=True)
