"""Helpers for the channels of the RabbitMQ transport: waiting while a robust channel reopens, a
throwaway channel for one short look at a queue, and telling a refusal from a lost connection.

`transport` waits with `wait_until_open` before a publish and `declarations` before a declaration;
`scratch_channel` serves `declarations` (does a queue exist?) and `error_queues` (listing,
replaying, purging), because a miss closes the channel it was asked on. `refused` is how
`transport` and `consumer` decide whether a consumer that could not start gives up or waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import AbstractConnection
from aiormq.exceptions import AMQPChannelError

__all__ = ["refused", "scratch_channel", "wait_until_open"]


def refused(error: BaseException, connection: AbstractConnection | None) -> bool:
    """Whether `error` is the broker refusing an operation on `connection` while it is still up
    (its queue is gone, no permission), rather than the connection lost under the operation."""
    return isinstance(error, AMQPChannelError) and connection is not None and not connection.is_closed


async def wait_until_open(channel: AbstractRobustChannel, check: Callable[[], object]) -> None:
    """Wait while aio-pika reopens `channel` (after a lost connection or a channel error).

    `check` raises when waiting is pointless (the transport was closed meanwhile).
    """
    while channel.is_closed:
        check()
        await channel.ready()
        if channel.is_closed:
            # ready() can return before the reopened channel counts as open.
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def scratch_channel(connection: AbstractRobustConnection) -> AsyncIterator[aio_pika.Channel]:
    """A plain channel for one short look (a passive declare, `basic.get`), closed afterwards.

    Not robust: nothing of it is restored after a reconnection. A miss closes it, and only it.
    """
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    try:
        await channel.initialize()
        yield channel
    finally:
        with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError, RuntimeError):
            await channel.close()
