"""The ledger: what the producers sent, what reached the consumers and what they did, in tables.

Each run has tables of its own, named after it (`tidings_verify_<run>_...`), in the database under
test, so that a record commits in the same transaction as what it records:

- `sent`: one row per message a producer made (its id, producer, sequence number, `plain` or
  `outbox`), written *before* the message leaves; `confirmed_at` is set once the broker confirmed
  a plain send, and in the producer's transaction for an outbox one (its commit is its confirm);
- `orders`: the business row of an outbox message, in the same transaction as its outbox row;
- `deliveries`: one row per delivery that reached a consumer's handler chain, written outside the
  inbox (duplicates included);
- `effects`: the handler's effect, written in the inbox's transaction; no unique key on purpose,
  so a second effect of one message shows as a second row;
- `faults`: the faults a chaos test or the user injected, with their start and end, for the time
  to recover after each.

Times are `time.time()`: the processes of a run share the machine's clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

__all__ = ["OUTBOX", "PLAIN", "Ledger", "LedgerTables"]

#: What the records are written with: a connection, or the session of a producer or the inbox.
Executor = AsyncConnection | AsyncSession

#: Modes of a sent message: straight to the broker, or through the transactional outbox.
PLAIN = "plain"
OUTBOX = "outbox"


@dataclass(frozen=True, slots=True)
class LedgerTables:
    """The tables of one run."""

    metadata: MetaData
    sent: Table
    orders: Table
    deliveries: Table
    effects: Table
    faults: Table

    @classmethod
    def of(cls, run: str) -> LedgerTables:
        prefix = f"tidings_verify_{run}"
        metadata = MetaData()
        sent = Table(
            f"{prefix}_sent",
            metadata,
            Column("message_id", String(64), primary_key=True),
            Column("producer", Integer, nullable=False),
            Column("seq", Integer, nullable=False),
            Column("mode", String(8), nullable=False),
            Column("created_at", Float, nullable=False),
            Column("confirmed_at", Float),
        )
        orders = Table(
            f"{prefix}_orders",
            metadata,
            Column("message_id", String(64), primary_key=True),
            Column("created_at", Float, nullable=False),
        )
        deliveries = Table(
            f"{prefix}_deliveries",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("message_id", String(64), nullable=False),
            Column("at", Float, nullable=False),
        )
        effects = Table(
            f"{prefix}_effects",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("message_id", String(64), nullable=False),
            Column("at", Float, nullable=False),
            Column("pid", Integer, nullable=False),
        )
        faults = Table(
            f"{prefix}_faults",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("name", String(200), nullable=False),
            Column("started_at", Float, nullable=False),
            Column("ended_at", Float, nullable=False),
        )
        # The checker joins on message ids: without these it would compare every pair.
        Index(f"{prefix}_deliveries_id", deliveries.c.message_id)
        Index(f"{prefix}_effects_id", effects.c.message_id)
        return cls(metadata, sent, orders, deliveries, effects, faults)


class Ledger:
    """The ledger of run `run` in `engine`'s database: creating it, writing to it, dropping it."""

    def __init__(self, engine: AsyncEngine, run: str) -> None:
        self.engine = engine
        self.run = run
        self.tables = LedgerTables.of(run)

    async def create(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(self.tables.metadata.create_all)

    async def drop(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(self.tables.metadata.drop_all)

    # -- what the processes write ------------------------------------------------------------

    async def sent(
        self,
        connection: Executor,
        message_id: str,
        *,
        producer: int,
        seq: int,
        mode: str,
        confirmed: bool = False,
    ) -> None:
        """Record a message about to leave (`confirmed`: its leaving commits with this row)."""
        now = time.time()
        row = {"message_id": message_id, "producer": producer, "seq": seq, "mode": mode, "created_at": now}
        row["confirmed_at"] = now if confirmed else None
        await connection.execute(insert(self.tables.sent), row)

    async def confirmed(self, connection: Executor, message_id: str) -> None:
        columns = self.tables.sent.c
        statement = update(self.tables.sent).where(columns.message_id == message_id)
        await connection.execute(statement.values(confirmed_at=time.time()))

    async def order(self, connection: Executor, message_id: str) -> None:
        """The business row an outbox message goes with."""
        await connection.execute(
            insert(self.tables.orders), {"message_id": message_id, "created_at": time.time()}
        )

    async def delivered(self, connection: Executor, message_id: str) -> None:
        await connection.execute(
            insert(self.tables.deliveries), {"message_id": message_id, "at": time.time()}
        )

    async def effect(self, connection: Executor, message_id: str, pid: int) -> None:
        row = {"message_id": message_id, "at": time.time(), "pid": pid}
        await connection.execute(insert(self.tables.effects), row)

    async def fault(self, name: str, started_at: float, ended_at: float) -> None:
        """Record a fault that lasted from `started_at` to `ended_at` (time.time())."""
        async with self.engine.begin() as connection:
            row = {"name": name, "started_at": started_at, "ended_at": ended_at}
            await connection.execute(insert(self.tables.faults), row)
