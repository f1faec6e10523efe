"""Queue depth: how many messages wait in each service's queue, asked of the transport directly.

The transport port has no depth query (the bus never needs one), so this reads it where each
transport keeps it: on SQLite, a read-only look at its messages table (a connection of its own,
in a thread, never the transport's writer); on RabbitMQ, a passive declare of the queue (its ready
messages; those delivered and not yet acknowledged are not counted). Elsewhere (memory) and on any
error: None, shown as unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence

from tidings.transports.base import Transport
from tidings.transports.sqlite import SQLiteTransport

__all__ = ["queue_depths"]


def _sqlite_depths(path: str, queues: Sequence[str]) -> dict[str, int | None]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as connection:
        marks = ", ".join("?" * len(queues))
        rows = connection.execute(
            f"SELECT queue, count(*) FROM tidings_messages WHERE queue IN ({marks}) GROUP BY queue",
            list(queues),
        ).fetchall()
    found: dict[str, int | None] = dict.fromkeys(queues, 0)
    found.update({queue: int(count) for queue, count in rows})
    return found


async def _rabbitmq_depths(transport: Transport, queues: Sequence[str]) -> dict[str, int | None]:
    from tidings.transports.rabbitmq import RabbitMQTransport
    from tidings.transports.rabbitmq.channels import scratch_channel

    assert isinstance(transport, RabbitMQTransport)
    found: dict[str, int | None] = {}
    for queue in queues:
        physical = transport.topology.queue(queue)
        try:
            if not await transport.queue_exists(physical):
                found[queue] = None
                continue
            async with scratch_channel(transport.connection()) as channel:
                declared = await channel.declare_queue(physical, passive=True)
                found[queue] = int(declared.declaration_result.message_count or 0)
        except Exception:
            found[queue] = None
    return found


async def queue_depths(transport: Transport, queues: Sequence[str]) -> dict[str, int | None]:
    """Messages in each queue now (None: unknown on this transport, or not readable)."""
    if not queues:
        return {}
    try:
        if isinstance(transport, SQLiteTransport):
            return await asyncio.to_thread(_sqlite_depths, transport.settings.path, queues)
        if type(transport).__name__ == "RabbitMQTransport":  # without importing aio-pika otherwise
            return await _rabbitmq_depths(transport, queues)
    except Exception:
        pass
    return dict.fromkeys(queues, None)
