"""The inbox: each handler call in a transaction that records the message; duplicates skipped."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.helpers import eventually, running
from tests.storage.messages import Answer, Ask, Credit, Deposited
from tidings import Bus, Context, Envelope, RetryPolicy
from tidings.inbox import InboxSettings
from tidings.storage import inbox_table, outbox_table

domain = MetaData()
credits = Table(
    "test_credits",
    domain,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(50)),
    Column("seq", Integer),
)


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


async def create_domain(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(domain.create_all)


async def count(engine: AsyncEngine, table: Table, *conditions: object) -> int:
    async with engine.connect() as connection:
        query = select(func.count()).select_from(table).where(*conditions)  # type: ignore[arg-type]
        return int((await connection.execute(query)).scalar_one())


async def send_raw(bus: Bus, command: Credit, *, message_id: str | None = None) -> str:
    """Put a command on the bus's own queue directly (the same id twice = a duplicate on the wire)."""
    envelope = bus.sender.envelope_for(command)
    if message_id is not None:
        envelope = Envelope.from_headers({**envelope.to_headers(), "id": message_id}, envelope.body)
    await bus.transport.send(envelope, bus.queue)
    return envelope.id


def accounts_bus(database: AsyncEngine, url: str, calls: list[int], **options: object) -> Bus:
    bus = Bus("accounts", transport=url, database=database, **options)  # type: ignore[arg-type]

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        calls.append(command.seq)
        await ctx.session.execute(insert(credits).values(account=command.account, seq=command.seq))
        await ctx.publish(Deposited(account=command.account, seq=command.seq))

    return bus


async def test_a_handler_runs_in_a_transaction_that_records_the_message(database: AsyncEngine) -> None:
    await create_domain(database)
    calls: list[int] = []
    bus = accounts_bus(database, memory_url(), calls)
    async with running(bus):
        message_id = await send_raw(bus, Credit(account="a", seq=1))
        await eventually(lambda: bus.stats.handled == 1)
    assert calls == [1]
    assert await count(database, credits) == 1
    assert await count(database, inbox_table, inbox_table.c.message_id == message_id) == 1
    # What the handler published went to the outbox in the same transaction, and was shipped.
    assert await count(database, outbox_table) == 1


async def test_a_duplicate_is_acknowledged_without_calling_the_handler(database: AsyncEngine) -> None:
    await create_domain(database)
    calls: list[int] = []
    bus = accounts_bus(database, memory_url(), calls, concurrency=1)
    async with running(bus):
        message_id = await send_raw(bus, Credit(account="a", seq=1))
        await send_raw(bus, Credit(account="a", seq=1), message_id=message_id)
        await send_raw(bus, Credit(account="a", seq=2))
        await eventually(lambda: bus.stats.handled == 3)
    assert calls == [1, 2]
    assert bus.stats.duplicates == 1
    assert await count(database, credits) == 2
    assert await count(database, outbox_table) == 2


async def test_a_failed_handler_leaves_no_record_no_effect_and_no_message(database: AsyncEngine) -> None:
    await create_domain(database)
    calls: list[int] = []
    bus = Bus(
        "accounts", transport=memory_url(), database=database, retry=RetryPolicy(immediate=1, delays=())
    )

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        calls.append(command.seq)
        await ctx.session.execute(insert(credits).values(account=command.account, seq=command.seq))
        await ctx.publish(Deposited(account=command.account, seq=command.seq))
        if len(calls) == 1:
            raise RuntimeError("first try fails after writing")

    async with running(bus):
        message_id = await send_raw(bus, Credit(account="a", seq=1))
        await eventually(lambda: bus.stats.handled == 1)
    assert calls == [1, 1]
    assert bus.stats.failed_attempts == 1
    assert await count(database, credits) == 1  # the first try's write was rolled back
    assert await count(database, outbox_table) == 1
    assert await count(database, inbox_table, inbox_table.c.message_id == message_id) == 1


async def test_a_reply_goes_through_the_outbox_in_the_handlers_transaction(database: AsyncEngine) -> None:
    url = memory_url()
    server = Bus("oracle", transport=url, database=database)

    @server.handle(Ask)
    async def answer(request: Ask, ctx: Context) -> Answer:
        return Answer(text=request.question.upper())

    client = Bus("client", transport=url)
    client.route(Ask, to="oracle")
    async with running(server, client):
        reply = await client.request(Ask(question="why"), expect=Answer, timeout=10)
        await eventually(lambda: server.relay.stats.sent == 1)  # type: ignore[union-attr]
    assert reply.text == "WHY"
    assert await count(database, outbox_table, outbox_table.c.queue == client.reply_queue) == 1


async def test_two_instances_handling_one_message_at_once_apply_it_once(database: AsyncEngine) -> None:
    """The primary key race: the second insert waits for the first transaction, then is a duplicate."""
    await create_domain(database)
    url = memory_url()
    first_inside = asyncio.Event()
    release_first = asyncio.Event()
    calls: list[str] = []

    def instance(name: str) -> Bus:
        bus = Bus("accounts", transport=url, database=database)

        @bus.handle(Credit)
        async def credit(command: Credit, ctx: Context) -> None:
            calls.append(name)
            await ctx.session.execute(insert(credits).values(account=name, seq=command.seq))
            first_inside.set()
            await release_first.wait()

        return bus

    one, two = instance("one"), instance("two")
    async with one, two:
        envelope = one.sender.envelope_for(Credit(account="a", seq=1))
        await one.transport.send(envelope, one.queue)
        await one.transport.send(envelope, one.queue)
        receiving_one = one.transport.receive(one.queue, prefetch=1)
        receiving_two = two.transport.receive(two.queue, prefetch=1)
        handling = asyncio.create_task(one._get_pipeline().process(await anext(receiving_one), one.queue))
        await first_inside.wait()
        racing = asyncio.create_task(two._get_pipeline().process(await anext(receiving_two), two.queue))
        await asyncio.sleep(
            0.2
        )  # the second insert reaches the database and waits there (or not: same result)
        release_first.set()
        await asyncio.gather(handling, racing)
        await receiving_one.aclose()
        await receiving_two.aclose()
    assert calls == ["one"]
    assert await count(database, credits) == 1
    assert one.stats.handled == 1
    assert two.stats.duplicates == 1


async def test_records_past_the_retention_are_deleted_in_bounded_batches(database: AsyncEngine) -> None:
    bus = Bus(
        "accounts",
        transport=memory_url(),
        database=database,
        inbox_settings=InboxSettings(retention=timedelta(days=1), cleanup_batch_size=2),
    )
    now = datetime.now(UTC)
    async with database.begin() as connection:
        await connection.execute(
            insert(inbox_table),
            [
                {"service": "accounts", "message_id": f"m{i}", "handled_at": now - timedelta(days=2)}
                for i in range(5)
            ]
            + [{"service": "accounts", "message_id": "fresh", "handled_at": now}]
            + [{"service": "other", "message_id": "m0", "handled_at": now - timedelta(days=2)}],
        )
    assert await bus.inbox.clean_up() == 5  # type: ignore[union-attr]
    remaining = await count(database, inbox_table)
    assert remaining == 2  # the fresh record, and another service's


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_a_database_that_is_down_puts_the_message_back_uncounted(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql":
        engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    else:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/missing-directory/db.sqlite")
    calls: list[int] = []
    bus = accounts_bus(engine, memory_url(), calls)
    try:
        async with running(bus):
            await send_raw(bus, Credit(account="a", seq=1))
            await eventually(lambda: bus.stats.unavailable >= 1)
    finally:
        await engine.dispose()
    assert calls == []
    assert bus.stats.failed_attempts == 0
    assert bus.stats.handled == 0
    assert bus.stats.dead_lettered == 0


async def test_a_programming_error_on_sqlite_is_a_failure_not_unavailable(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")  # no domain tables
    calls: list[int] = []
    bus = accounts_bus(engine, memory_url(), calls, retry=RetryPolicy(immediate=0, delays=()))
    await bus.create_tables()  # the inbox works; the handler's INSERT finds no table
    try:
        async with running(bus):
            await send_raw(bus, Credit(account="a", seq=1))
            await eventually(lambda: bus.stats.dead_lettered == 1)
    finally:
        await engine.dispose()
    assert bus.stats.unavailable == 0
    assert bus.stats.failed_attempts == 1


async def test_handlers_state_survives_the_commit(database: AsyncEngine) -> None:
    """expire_on_commit=False: what the handler loaded is readable after the commit."""
    await create_domain(database)
    seen: list[int] = []
    bus = Bus("accounts", transport=memory_url(), database=database)

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        await ctx.session.execute(insert(credits).values(account="a", seq=command.seq))
        await ctx.session.execute(update(credits).values(seq=credits.c.seq + 1))
        seen.append((await ctx.session.execute(select(credits.c.seq))).scalar_one())

    async with running(bus):
        await send_raw(bus, Credit(account="a", seq=1))
        await eventually(lambda: bus.stats.handled == 1)
    assert seen == [2]
