"""Benchmark: the reliable path (inbox + outbox) beside the plain one, and the outbox relay.

    .venv/bin/python bench/reliable_throughput.py [--messages 5000] [--concurrency 16]
        [--transport auto|rabbitmq|sqlite] [--database postgresql+asyncpg://postgres@127.0.0.1:5432/test]

One run, three measures, on PostgreSQL (a schema of its own, dropped afterwards) and RabbitMQ
(`auto`: RabbitMQ when it answers, else the SQLite transport):

1. handler throughput, plain: the handler writes a domain row in its own transaction, commits,
   then publishes its event straight to the broker (confirmed);
2. handler throughput, reliable: the same handler with `Bus(database=engine)`: the inbox record,
   the domain row and the outbox row in one transaction, shipped by the relay in `bus.run()`;
3. relay throughput: committed outbox rows shipped to the broker and marked sent (batches of 100).

Also: "domain row + outbox row" transactions per second from one writer (the producer's cost).
Messages are preloaded into the queue; a measure runs from `run()` to the last one handled
(and, for the reliable path, to the last event shipped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from tidings import Bus, Command, Context, Event
from tidings.outbox import OutboxSettings
from tidings.storage import metadata as tidings_metadata
from tidings.storage import outbox_table


class Deposit(Command, name="bench.deposit"):
    account: str
    amount: int


class Deposited(Event, name="bench.deposited"):
    account: str
    amount: int


domain = MetaData()
deposits = Table(
    "bench_deposits",
    domain,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("account", String(50), nullable=False),
    Column("amount", Integer, nullable=False),
)


def rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            pass
    except OSError:
        return False
    return True


async def transport_url(kind: str) -> str:
    if kind == "auto":
        kind = "rabbitmq" if rabbitmq_answers() and await _amqp_handshake() else "sqlite"
    if kind == "rabbitmq":
        return f"amqp://guest:guest@127.0.0.1:5672/?namespace=bench{uuid.uuid4().hex[:8]}"
    return f"sqlite:///{tempfile.mkdtemp(prefix='tidings-bench-')}/bus.db"


async def _amqp_handshake() -> bool:
    from tidings.transports import transport_from_url

    try:
        async with transport_from_url("amqp://guest:guest@127.0.0.1:5672/?namespace=benchprobe"):
            return True
    except Exception:
        return False


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 (counters, not events, are what we can watch)
        await asyncio.sleep(0.005)


async def handler_throughput(
    url: str, engine: AsyncEngine, messages: int, concurrency: int, *, reliable: bool
) -> tuple[float, float]:
    """(handled/s, shipped/s): the ledger service handles `messages` preloaded deposits."""
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    service = f"ledger{uuid.uuid4().hex[:6]}"
    bus = Bus(
        service,
        transport=url,
        concurrency=concurrency,
        database=engine if reliable else None,
        outbox_settings=OutboxSettings(batch_size=100),
    )

    @bus.handle(Deposit)
    async def deposit(command: Deposit, ctx: Context) -> None:
        event = Deposited(account=command.account, amount=command.amount)
        if reliable:
            await ctx.session.execute(insert(deposits).values(account=command.account, amount=command.amount))
            await ctx.publish(event)
        else:
            async with sessions() as session, session.begin():
                await session.execute(insert(deposits).values(account=command.account, amount=command.amount))
            await ctx.publish(event)

    async with bus:
        for index in range(messages):
            await bus.transport.send(
                bus.sender.envelope_for(Deposit(account=f"a{index % 100}", amount=index)), bus.queue
            )
        started = time.perf_counter()
        running = asyncio.create_task(bus.run())
        await wait_until(lambda: bus.stats.handled >= messages)
        handled = time.perf_counter() - started
        if reliable:
            relay = bus.relay  # type: ignore[union-attr]
            await wait_until(lambda: relay.stats.sent >= messages)
        shipped = time.perf_counter() - started
        bus.stop()
        await running
    return messages / handled, messages / shipped


async def outbox_writes(url: str, engine: AsyncEngine, messages: int) -> float:
    """'Domain row + outbox row' transactions per second, one writer, one connection at a time."""
    bus = Bus(f"writer{uuid.uuid4().hex[:6]}", transport=url, database=engine)
    started = time.perf_counter()
    async with AsyncSession(engine) as session:
        for index in range(messages):
            async with session.begin():
                await session.execute(insert(deposits).values(account="w", amount=index))
                await bus.publish(Deposited(account="w", amount=index), session=session)
    return messages / (time.perf_counter() - started)


async def relay_throughput(url: str, engine: AsyncEngine, messages: int, *, per_transaction: int) -> float:
    """Committed outbox rows shipped to the broker and marked sent, per second.

    Rows of one transaction form one ordered chain (sent one after the other); rows of different
    transactions go side by side. The rows are inserted directly (the setup is not measured).
    """
    bus = Bus(
        f"relay{uuid.uuid4().hex[:6]}",
        transport=url,
        database=engine,
        outbox_settings=OutboxSettings(batch_size=100),
    )
    rows = []
    for index in range(messages):
        envelope = bus.sender.envelope_for(Deposited(account=f"a{index % 100}", amount=index))
        rows.append(
            {
                "service": bus.service,
                "message_id": envelope.id,
                "headers": json.dumps(envelope.to_headers()),
                "body": envelope.body,
                "transaction_key": index // per_transaction,
                "created_at": datetime.now(UTC),
            }
        )
    async with engine.begin() as connection:
        await connection.execute(insert(outbox_table), rows)
    async with bus:
        relay = bus.relay  # type: ignore[union-attr]
        started = time.perf_counter()
        while relay.stats.sent < messages:
            await relay.relay_once()
        return messages / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--transport", choices=["auto", "rabbitmq", "sqlite"], default="auto")
    parser.add_argument("--database", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(args.database)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_async_engine(
        args.database,
        pool_size=args.concurrency + 4,
        connect_args={"server_settings": {"search_path": schema}},
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(tidings_metadata.create_all)
            await connection.run_sync(domain.create_all)
        url = await transport_url(args.transport)
        print(
            f"transport {url.split('?')[0]}, database {args.database}, {args.messages} messages, "
            f"concurrency {args.concurrency}"
        )
        plain, _ = await handler_throughput(url, engine, args.messages, args.concurrency, reliable=False)
        reliable, shipped = await handler_throughput(
            url, engine, args.messages, args.concurrency, reliable=True
        )
        writes = await outbox_writes(url, engine, min(args.messages, 2000))
        relay_single = await relay_throughput(url, engine, args.messages, per_transaction=1)
        relay_chained = await relay_throughput(url, engine, args.messages, per_transaction=100)
        print()
        print("| measure | per second |")
        print("|---|---:|")
        print(f"| handler, plain (own transaction + direct publish) | {plain:,.0f} |")
        print(f"| handler, reliable (inbox + outbox, one transaction) | {reliable:,.0f} |")
        print(f"| reliable, to the last event shipped by the relay | {shipped:,.0f} |")
        print(f"| reliable / plain | {reliable / plain:.2f} x |")
        print(f"| domain row + outbox row transactions, one writer | {writes:,.0f} |")
        print(f"| relay, outbox → broker, one message per transaction (batch 100) | {relay_single:,.0f} |")
        print(f"| relay, outbox → broker, 100 messages per transaction (in order) | {relay_chained:,.0f} |")
    finally:
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
