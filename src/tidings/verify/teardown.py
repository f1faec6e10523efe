"""Removing what a verification run created: its queues on the broker, its rows and tables.

A run names everything after itself (`tidings.verify.messages`, `tidings.verify.ledger`), so it
removes exactly that: the consumers' queue and error queue, the outbox and inbox rows of its two
services, its ledger tables, and the outbox and inbox tables when the run created them (they
were not there before). The transport port has no "delete a queue", so this speaks to each
broker in its own terms.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from tidings.storage import inbox_table, metadata, outbox_table
from tidings.transports import transport_from_url
from tidings.transports.base import error_queue_of

__all__ = ["drop_tables", "missing_tables", "remove_queues", "remove_rows"]


async def remove_queues(transport_url: str, queues: Sequence[str]) -> None:
    """Delete `queues` and their error queues (RabbitMQ, SQLite; nothing to do in memory)."""
    names = [*queues, *(error_queue_of(queue) for queue in queues)]
    scheme = transport_url.partition(":")[0].lower()
    if scheme in ("amqp", "amqps"):
        await _remove_rabbitmq_queues(transport_url, names)
    elif scheme == "sqlite":
        from tidings.transports.sqlite import SQLiteTransport

        transport = transport_from_url(transport_url)
        assert isinstance(transport, SQLiteTransport)
        await asyncio.to_thread(_remove_sqlite_queues, transport.settings.path, names)


async def _remove_rabbitmq_queues(url: str, names: Sequence[str]) -> None:
    import aio_pika

    from tidings.transports.rabbitmq.settings import RabbitMQSettings
    from tidings.transports.rabbitmq.topology import Topology

    settings = RabbitMQSettings.from_url(url)
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.broker_url, timeout=settings.connect_timeout)
    async with connection:
        for name in names:
            # A channel per queue: deleting a queue that is not there closes the channel.
            channel = await connection.channel()
            try:
                await channel.queue_delete(topology.queue(name))
            except aio_pika.exceptions.AMQPError:
                pass  # gone already: nothing to remove
            finally:
                if not channel.is_closed:
                    await channel.close()


def _remove_sqlite_queues(path: str, names: Sequence[str]) -> None:
    # The reply queues of consumers that were killed too: their leases would let the next
    # transport that opens delete them, but the run leaves nothing behind.
    where = " OR ".join(["{column} = ?", "{column} LIKE ?"] * len(names))
    values = [value for name in names for value in (name, f"{name}.replies.%")]
    connection = sqlite3.connect(path, timeout=60)
    try:
        with connection:
            for table, column in (
                ("tidings_messages", "queue"),
                ("tidings_bindings", "queue"),
                ("tidings_queues", "name"),
            ):
                connection.execute(f"DELETE FROM {table} WHERE " + where.format(column=column), values)
    except sqlite3.OperationalError:
        pass  # no tidings tables in that file: nothing of this run there
    finally:
        connection.close()


async def missing_tables(engine: AsyncEngine) -> list[str]:
    """The outbox and inbox tables not in the database yet."""

    def absent(connection: object) -> list[str]:
        from sqlalchemy import inspect

        tables = inspect(connection)
        return [table.name for table in metadata.sorted_tables if not tables.has_table(table.name)]

    async with engine.connect() as connection:
        return await connection.run_sync(absent)


async def remove_rows(engine: AsyncEngine, services: Sequence[str]) -> None:
    """Delete the outbox and inbox rows of `services`."""
    async with engine.begin() as connection:
        await connection.execute(delete(outbox_table).where(outbox_table.c.service.in_(services)))
        await connection.execute(delete(inbox_table).where(inbox_table.c.service.in_(services)))


async def drop_tables(engine: AsyncEngine, names: Sequence[str]) -> None:
    """Drop the tidings tables named (those the run created)."""
    tables = [table for table in metadata.sorted_tables if table.name in names]
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: metadata.drop_all(sync, tables=tables))
