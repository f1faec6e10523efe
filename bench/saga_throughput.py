"""Benchmark: saga steps per second, beside a plain inbox handler doing the same work by hand.

    .venv/bin/python bench/saga_throughput.py [--keys 500] [--steps 6] [--concurrency 16]
        [--databases sqlite,postgresql] [--transport memory|sqlite]

For each database (a SQLite file in WAL mode; PostgreSQL in a schema of its own, dropped after),
one run, two measures on the same preloaded messages (`keys` x `steps` commands, keys interleaved
so that messages handled at once are mostly for different instances):

1. plain: a handler with `Bus(database=engine)` (the inbox transaction) keeps a counter per key
   by hand: UPDATE .. SET n = n + 1, and an INSERT when there was no row: what the eshop's
   ordering did before it was a saga;
2. saga: the same counter as a saga's state (`@starts(Tick, by="key")`, `self.state.n += 1`): the
   row read, the step, the versioned write, in a savepoint of the same inbox transaction.

Each measure runs from `run()` to the last message handled; the two alternate for `--rounds`
rounds and the medians are printed, with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tidings import Bus, Command, Context, Saga, SagaContext, starts
from tidings.sagas.store import metadata as saga_metadata
from tidings.storage import metadata as tidings_metadata

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class Tick(Command, name="bench.tick"):
    key: str


domain = MetaData()
counters = Table(
    "bench_counters",
    domain,
    Column("key", String(64), primary_key=True),
    Column("n", Integer, nullable=False),
)


class Count(BaseModel):
    n: int = 0


class Counter(Saga[Count], name="bench.counter"):
    @starts(Tick, by="key")
    async def tick(self, message: Tick, ctx: SagaContext) -> None:
        self.state.n += 1


async def plain_tick(message: Tick, ctx: Context) -> None:
    changed = await ctx.session.execute(
        update(counters).where(counters.c.key == message.key).values(n=counters.c.n + 1)
    )
    if changed.rowcount == 0:
        await ctx.session.execute(insert(counters).values(key=message.key, n=1))


def sqlite_engine(path: Path) -> AsyncEngine:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _wal(connection: object, _record: object) -> None:
        cursor = connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


async def measure(
    engine: AsyncEngine,
    transport: str,
    keys: int,
    steps: int,
    concurrency: int,
    register: Callable[[Bus], None],
) -> float:
    """Messages handled per second by a bus that `register` set up, on a fresh set of tables."""
    async with engine.begin() as connection:
        for tables in (domain, saga_metadata, tidings_metadata):
            await connection.run_sync(tables.drop_all)
            await connection.run_sync(tables.create_all)
    bus = Bus(f"bench-{uuid.uuid4().hex[:8]}", transport, database=engine, concurrency=concurrency)
    register(bus)
    total = keys * steps
    async with bus:
        for _ in range(steps):
            for key in range(keys):
                await bus.send(Tick(key=f"k{key}"))
        started = time.perf_counter()
        running = asyncio.create_task(bus.run())
        while bus.stats.handled < total:  # noqa: ASYNC110 (the bus counts; nothing to wait on)
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        bus.stop()
        await running
    assert bus.stats.failed_attempts == 0
    assert bus.stats.dead_lettered == 0
    if bus.sagas is not None and bus.sagas.stats.conflicts:
        print(f"    ({bus.sagas.stats.conflicts} conflicts, each a step run again)")
    return total / elapsed


async def on(
    name: str, engine: AsyncEngine, transport: str, keys: int, steps: int, concurrency: int, rounds: int
) -> None:
    # Alternated, and the median of each: on a shared machine the load changes within a run.
    plains: list[float] = []
    sagas: list[float] = []
    for _ in range(rounds):
        plains.append(
            await measure(
                engine, transport, keys, steps, concurrency, lambda bus: bus.handle(Tick)(plain_tick)
            )
        )
        sagas.append(
            await measure(engine, transport, keys, steps, concurrency, lambda bus: bus.saga(Counter))
        )
    plain, saga = statistics.median(plains), statistics.median(sagas)
    print(f"{name:10}  plain inbox handler {plain:7.0f}/s   saga steps {saga:7.0f}/s", end="")
    print(f"   saga / plain {saga / plain:.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each; medians")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--transport", choices=("memory", "sqlite"), default="memory")
    args = parser.parse_args()
    messages = args.keys * args.steps
    print(f"{args.keys} keys x {args.steps} steps = {messages} messages, concurrency {args.concurrency}")
    with tempfile.TemporaryDirectory() as directory:
        transport = "memory://bench" if args.transport == "memory" else f"sqlite:///{directory}/bus.db"
        for kind in args.databases.split(","):
            if kind == "sqlite":
                engine = sqlite_engine(Path(directory) / "service.db")
                await on("SQLite", engine, transport, args.keys, args.steps, args.concurrency, args.rounds)
                await engine.dispose()
            elif kind == "postgresql":
                schema = f"bench_saga_{uuid.uuid4().hex[:8]}"
                admin = create_async_engine(POSTGRES)
                async with admin.begin() as connection:
                    await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
                engine = create_async_engine(
                    POSTGRES,
                    pool_size=args.concurrency,
                    connect_args={"server_settings": {"search_path": schema}},
                )
                try:
                    await on(
                        "PostgreSQL", engine, transport, args.keys, args.steps, args.concurrency, args.rounds
                    )
                finally:
                    await engine.dispose()
                    async with admin.begin() as connection:
                        await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                    await admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
