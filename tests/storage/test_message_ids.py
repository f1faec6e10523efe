"""The inbox takes any message id an AMQP peer may send (up to 255 characters); a longer one is refused
when the envelope is read, with a reason code, before any handler or database sees it.

The inbox column was `String(64)`: on PostgreSQL a longer foreign id failed the insert with a
`DataError` that ended as `handler-failed`.
"""

from __future__ import annotations

import dataclasses
import uuid

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.helpers import eventually, running
from tests.storage.messages import Credit
from tidings import Bus, Context, DeadLetters, Envelope
from tidings.storage import inbox_table


def _with_id(bus: Bus, message_id: str) -> Envelope:
    """A message as a foreign peer might send it: with an id of its choosing."""
    return dataclasses.replace(bus.sender.envelope_for(Credit(account="a", seq=1)), id=message_id)


async def test_the_inbox_records_a_255_character_foreign_id(database: AsyncEngine) -> None:
    bus = Bus("ledger", transport=f"memory://{uuid.uuid4().hex}", database=database)
    handled: list[str] = []

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        handled.append(ctx.message_id)

    long_id = "m" * 255
    async with running(bus):
        await bus.transport.send(_with_id(bus, long_id), bus.queue)
        await eventually(lambda: bus.stats.handled == 1)
    async with database.connect() as connection:
        recorded = (
            await connection.execute(
                select(func.count()).select_from(inbox_table).where(inbox_table.c.message_id == long_id)
            )
        ).scalar_one()
    assert handled == [long_id]
    assert recorded == 1
    assert bus.stats.failed_attempts == 0


async def test_an_id_longer_than_255_characters_is_dead_lettered_as_a_bad_attribute(
    database: AsyncEngine,
) -> None:
    bus = Bus("ledger", transport=f"memory://{uuid.uuid4().hex}", database=database)
    handled: list[str] = []

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        handled.append(ctx.message_id)

    async with running(bus):
        await bus.transport.send(_with_id(bus, "m" * 256), bus.queue)
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert failed.fault.reason == "bad-attribute"
    assert "256 characters" in (failed.fault.message or "")
    assert handled == []
