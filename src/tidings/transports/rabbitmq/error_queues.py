"""Reading, replaying and purging a queue's error queue on RabbitMQ.

AMQP has no way to look at a message without taking it, so listing takes messages with
`basic.get` on a channel of its own and then closes that channel: the broker puts back everything
the channel held. A quorum queue takes them back asynchronously, so the call waits until they are
ready again: a replay right after a listing finds them.

`transport` makes one `ErrorQueues` and hands it what it needs: the topology (the names of the
error queues), a callable that returns the open connection, the lookup of whether a queue exists
(`Declarations.queue_exists`) and the confirmed send to a queue that a replay publishes with.
Nothing here knows the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from tidings.errors import NoRoute, TransportError
from tidings.headers import FAULT_PREFIX, strip_fault_headers
from tidings.transports.base import DeadLetter
from tidings.transports.rabbitmq.channels import scratch_channel
from tidings.transports.rabbitmq.codec import OutgoingMessage, decode_headers, encode_message
from tidings.transports.rabbitmq.topology import Topology

__all__ = ["ErrorQueues"]

_FAULT_REASON = f"{FAULT_PREFIX}reason"
# Replayed messages are published in batches, so that their confirms overlap.
_REPLAY_BATCH = 100
# How long to wait for the broker to take back what a listing held (it takes milliseconds).
_GIVE_BACK_WAIT = 5.0
_ERRORS = (AMQPError, ChannelInvalidStateError)


class ErrorQueues:
    """The dead-letter operations of one RabbitMQ transport.

    `connection` returns the transport's open connection, or raises `TransportClosed`;
    `queue_exists` says whether RabbitMQ has a queue (by its RabbitMQ name); `send_now` publishes
    a message to a queue of the port and waits for the confirm; `url` names the broker in errors.
    """

    def __init__(
        self,
        topology: Topology,
        connection: Callable[[], AbstractRobustConnection],
        queue_exists: Callable[[str], Awaitable[bool]],
        send_now: Callable[[OutgoingMessage, str], Awaitable[None]],
        *,
        url: str,
    ) -> None:
        self._topology = topology
        self._connection = connection
        self._queue_exists = queue_exists
        self._send_now = send_now
        self._url = url

    @contextlib.asynccontextmanager
    async def _reading(self, queue: str) -> AsyncIterator[tuple[AbstractQueue, int]]:
        """`queue`'s error queue on a channel of its own, and how many messages it had ready.

        On the way out the channel closes, and the call waits until the messages that were
        taken and not acked are back.
        """
        physical = self._topology.error_queue(queue)
        if not await self._queue_exists(physical):
            raise NoRoute(f"no queue {queue!r} at {self._url}")
        try:
            async with scratch_channel(self._connection()) as channel:
                amqp_queue = await channel.declare_queue(physical, passive=True)
                yield amqp_queue, amqp_queue.declaration_result.message_count or 0
        except _ERRORS as error:
            raise TransportError(f"{self._url}: error queue {physical}: {error}") from None

    async def _wait_until_back(self, physical: str, ready: int) -> None:
        try:
            async with (
                scratch_channel(self._connection()) as channel,
                asyncio.timeout(_GIVE_BACK_WAIT),
            ):
                while True:
                    amqp_queue = await channel.declare_queue(physical, passive=True)
                    if (amqp_queue.declaration_result.message_count or 0) >= ready:
                        return
                    await asyncio.sleep(0.01)
        except (TimeoutError, *_ERRORS):
            pass  # someone else consumes from it, or it is gone: nothing to wait for

    async def list(self, queue: str, limit: int) -> Sequence[DeadLetter]:
        letters: list[DeadLetter] = []
        async with self._reading(queue) as (amqp_queue, ready):
            while len(letters) < min(limit, ready):
                message = await amqp_queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = dead_letter_headers(message)
                letters.append(DeadLetter(headers.get("id", ""), headers, message.body))
        if letters:
            await self._wait_until_back(amqp_queue.name, ready)
        return letters

    async def replay(self, queue: str, message_ids: Sequence[str] | None) -> int:
        wanted = None if message_ids is None else set(message_ids)
        moved = 0
        removed = 0
        kept = 0
        # A dead letter can be there twice (stored, then the process died before it acked the
        # original, which came back and failed again): it goes back once, the oldest copy, and
        # the later copies leave the error queue once that one is confirmed.
        replayed: set[str] = set()
        async with self._reading(queue) as (amqp_queue, ready):
            # Only what is there now: a replayed message that fails again stays for next time.
            remaining = ready
            while remaining > 0:
                batch: list[AbstractIncomingMessage] = []
                copies: list[AbstractIncomingMessage] = []
                while remaining > 0 and len(batch) < _REPLAY_BATCH:
                    remaining -= 1
                    message = await amqp_queue.get(no_ack=False, fail=False)
                    if message is None:
                        remaining = 0
                        continue
                    message_id = dead_letter_headers(message).get("id", "")
                    if wanted is not None and message_id not in wanted:
                        kept += 1  # stays unacked, so no later get returns it again
                    elif message_id and message_id in replayed:
                        copies.append(message)
                    else:
                        replayed.add(message_id)
                        batch.append(message)
                await asyncio.gather(*(self._replay_one(queue, message) for message in batch))
                for message in (*batch, *copies):
                    await message.ack()
                moved += len(batch)
                removed += len(batch) + len(copies)
        if kept:
            await self._wait_until_back(amqp_queue.name, ready - removed)
        return moved

    async def _replay_one(self, queue: str, message: AbstractIncomingMessage) -> None:
        headers = strip_fault_headers(dead_letter_headers(message))
        await self._send_now(encode_message(headers, message.body), queue)

    async def purge(self, queue: str) -> int:
        async with self._reading(queue) as (amqp_queue, _):
            result = await amqp_queue.purge()
        return int(result.message_count or 0)


def dead_letter_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    """The flat header map of a dead letter, with a fault reason even if the broker moved it."""
    headers = decode_headers(
        message.headers, content_type=message.content_type, message_id=message.message_id
    )
    # A message the broker moved itself (over the delivery limit) carries no fault headers of
    # ours; say why it is here: `delivery-limit`, `rejected`, `expired`, `maxlen`.
    reason = (message.headers or {}).get("x-first-death-reason")
    if reason is not None and _FAULT_REASON not in headers:
        # Set by the broker, but a foreign publisher can set it too: never fail a listing on it.
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)[:100]
        headers[_FAULT_REASON] = text.replace("_", "-")
    return headers
