"""The processes of the crash tests: a producer, writers, and (through the CLI) relay and consumer.

Configured by environment variables, so `tidings run tests.storage.app:ledger` and
`tidings relay tests.storage.app:bank` load the same buses:

- `TEST_DATABASE`: `sqlite:<path>` or `postgresql:<schema>` (see `databases.py`);
- `TIDINGS_TRANSPORT`: the transport URL (read by `Bus` itself);
- `TEST_DELIVERIES`: a file the ledger appends `start <id>` / `done <id>` to for every delivery;
- `TEST_CLAIM_TIMEOUT`, `TEST_POLL_INTERVAL`: the relay's lease and polling, in seconds;
- `TIDINGS_CRASH_AT`: the test-only crash point (`tidings.storage.crashpoints`).

Commands: `python -m tests.storage.app produce COUNT [--per-transaction K] [--with-relay]`,
`python -m tests.storage.app write WRITERS PER_WRITER`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from tests.storage.databases import effects, engine_for, produced
from tests.storage.messages import Credit
from tidings import Bus, Context, Message, Next
from tidings.outbox import OutboxSettings
from tidings.storage import outbox_table

database = engine_for(os.environ.get("TEST_DATABASE", "sqlite:unset.db"), pool_size=20)
settings = OutboxSettings(
    claim_timeout=float(os.environ.get("TEST_CLAIM_TIMEOUT", "2")),
    poll_interval=float(os.environ.get("TEST_POLL_INTERVAL", "0.05")),
)


async def log_deliveries(ctx: Context, message: Message, call_next: Next) -> Any:
    """Outside the inbox: sees every delivery, duplicates included; `done` once it has committed."""
    _log("start", ctx.message_id)
    result = await call_next(ctx, message)
    _log("done", ctx.message_id)
    return result


def _log(what: str, message_id: str) -> None:
    path = os.environ.get("TEST_DELIVERIES")
    if path:
        # O_APPEND: lines of several processes never interleave; the kernel keeps them past a kill.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, f"{what} {message_id}\n".encode())
        finally:
            os.close(descriptor)


bank = Bus("bank", database=database, outbox_settings=settings)
bank.route(Credit, to="ledger")

ledger = Bus(
    "ledger",
    database=database,
    outbox_settings=settings,
    middleware=(log_deliveries,),
)


@ledger.handle(Credit)
async def credit(command: Credit, ctx: Context) -> None:
    await ctx.session.execute(insert(effects).values(seq=command.seq, message_id=ctx.message_id))


async def produce(count: int, per_transaction: int, with_relay: bool) -> None:
    """Send Credit 1..count, each with its `produced` row; resumes after the last committed one."""
    sessions = async_sessionmaker(database)
    async with bank:
        relaying = asyncio.create_task(bank.relay.run()) if with_relay else None  # type: ignore[union-attr]
        async with database.connect() as connection:
            seq = int(
                (await connection.execute(select(func.coalesce(func.max(produced.c.seq), 0)))).scalar_one()
            )
        while seq < count:
            async with sessions() as session, session.begin():
                batch = range(seq + 1, min(count, seq + per_transaction) + 1)
                await session.execute(insert(produced), [{"seq": number} for number in batch])
                for number in batch:
                    account = f"a{number % 7}"
                    await bank.send(Credit(account=account, seq=number), session=session, subject=account)
                seq = batch[-1]
        if relaying is not None:
            while await _unsent() > 0:  # noqa: ASYNC110 (another process's commits: nothing to wait on)
                await asyncio.sleep(0.05)
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
    await database.dispose()


async def _unsent() -> int:
    async with database.connect() as connection:
        query = select(func.count()).select_from(outbox_table).where(outbox_table.c.sent_at.is_(None))
        return int((await connection.execute(query)).scalar_one())


async def write(writers: int, per_writer: int) -> None:
    """Test d: `writers` concurrent writers, each `per_writer` transactions of one message.

    Each transaction pauses a random moment before its commit, so transactions commit out of the
    order in which they took their ids (on PostgreSQL; SQLite has one writer at a time).
    """
    sessions = async_sessionmaker(database)

    async def writer(first: int) -> None:
        for seq in range(first, first + per_writer):
            async with sessions() as session, session.begin():
                await session.execute(insert(produced).values(seq=seq))
                await bank.send(Credit(account=f"w{first}", seq=seq), session=session)
                await asyncio.sleep(random.random() * 0.01)

    await asyncio.gather(*(writer(1 + k * per_writer) for k in range(writers)))
    await database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.storage.app")
    commands = parser.add_subparsers(dest="command", required=True)
    producing = commands.add_parser("produce")
    producing.add_argument("count", type=int)
    producing.add_argument("--per-transaction", type=int, default=1)
    producing.add_argument("--with-relay", action="store_true")
    writing = commands.add_parser("write")
    writing.add_argument("writers", type=int)
    writing.add_argument("per_writer", type=int)
    args = parser.parse_args()
    if args.command == "produce":
        asyncio.run(produce(args.count, args.per_transaction, args.with_relay))
    else:
        asyncio.run(write(args.writers, args.per_writer))


if __name__ == "__main__":
    main()
