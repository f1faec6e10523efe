"""Consuming from RabbitMQ: one channel per `receive()`, its prefetch as `basic.qos`, manual acks.

The channel is an aio-pika robust channel: after a lost connection it reopens, sets the prefetch
again and resumes consuming by itself. Deliveries that arrived on the lost channel are void (the
broker has already put them back); those not yet handed out are dropped, and settling one already
handed out does nothing, because the broker redelivers it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from tidings.errors import TransportClosed, TransportError
from tidings.transports.base import Delivery
from tidings.transports.rabbitmq_codec import DUE_HEADER, decode_headers

if TYPE_CHECKING:
    from tidings.transports.rabbitmq import RabbitMQTransport

__all__ = ["Consumer", "RabbitMQDelivery"]

log = logging.getLogger("tidings.transports.rabbitmq")

# What the consumer callback puts in the buffer when the transport closes: the receiver's cue.
_CLOSED = None
_SETTLE_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    headers = message.headers or {}
    # Quorum queues count earlier deliveries; RabbitMQ 4.3 counts them as x-acquired-count, as
    # x-delivery-count only the failed ones. Classic queues only say "not the first time".
    for key in ("x-acquired-count", "x-delivery-count"):
        earlier = headers.get(key)
        if isinstance(earlier, int) and not isinstance(earlier, bool):
            return earlier + 1
    return 2 if message.redelivered else 1


def _channel_alive(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018  (raises once the channel it came on is closed)
    except ChannelInvalidStateError:
        return False
    return True


class RabbitMQDelivery(Delivery):
    """A message received on a consumer's channel, settled on that channel."""

    __slots__ = ("_consumer", "_message", "_settled")

    def __init__(
        self,
        consumer: Consumer,
        message: AbstractIncomingMessage,
        headers: Mapping[str, str],
    ) -> None:
        self.headers = headers
        self.body = message.body
        self.delivery_count = _delivery_count(message)
        self._consumer = consumer
        self._message = message
        self._settled = False

    async def ack(self) -> None:
        await self._settle(self._message.ack)

    async def release(self) -> None:
        # basic.nack, not basic.reject: from RabbitMQ 4.3 on, nack does not count towards the
        # delivery limit, and a release is not the message's fault.
        await self._settle(lambda: self._message.nack(requeue=True))

    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        transport = self._consumer.transport
        await self._settle(
            self._message.ack,
            first=lambda: transport.requeue_copy(self._consumer.queue, headers, self.body, delay),
        )

    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        transport = self._consumer.transport
        await self._settle(
            self._message.ack,
            first=lambda: transport.store_dead_letter(self._consumer.queue, headers, self.body),
        )

    async def _settle(
        self,
        settle: Callable[[], Awaitable[None]],
        *,
        first: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if self._settled:
            return
        if not _channel_alive(self._message):
            # The broker took the message back when the channel went: it comes again, with a
            # higher delivery count. Publishing a copy now would only make a duplicate.
            log.warning("%s: delivery from a lost channel not settled; it will be redelivered",
                        self._consumer.transport.url)  # fmt: skip
            self._finish()
            return
        if first is not None:
            await first()  # raises when not confirmed: the delivery stays unsettled
        try:
            await settle()
        except _SETTLE_ERRORS as error:
            log.warning("%s: could not settle a delivery (%s); it will be redelivered",
                        self._consumer.transport.url, error)  # fmt: skip
        self._finish()

    def _finish(self) -> None:
        self._settled = True
        self._consumer.settled(self)


class Consumer:
    """The state behind one `receive()` call."""

    def __init__(self, transport: RabbitMQTransport, queue: str, prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        self.transport = transport
        self.queue = queue
        self.prefetch = prefetch
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._unsettled: set[RabbitMQDelivery] = set()
        self._channel: AbstractRobustChannel | None = None
        self._amqp_queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._stopping = False
        self._closing: asyncio.Task[None] | None = None

    async def start(self, channel: AbstractRobustChannel, physical_queue: str) -> None:
        self._channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        self._amqp_queue = await channel.declare_queue(physical_queue, passive=True)
        self._consumer_tag = await self._amqp_queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            # Arrived after stop() emptied the buffer: nobody will take it, so give it back.
            await _quietly(message.nack(requeue=True))
            return
        self._buffer.put_nowait(message)

    def wake(self) -> None:
        """The transport closed: make the receiver stop waiting."""
        self._buffer.put_nowait(_CLOSED)

    async def next(self) -> RabbitMQDelivery:
        """The next delivery; `TransportClosed` once the transport closed."""
        while True:
            message = await self._buffer.get()
            if message is _CLOSED:
                self._buffer.put_nowait(_CLOSED)  # every later call raises too
                raise TransportClosed(f"{self.transport.url} is closed")
            if not _channel_alive(message):
                continue  # void: the broker put it back when the channel was lost
            headers = decode_headers(
                message.headers,
                content_type=message.content_type,
                message_id=message.message_id,
            )
            if DUE_HEADER in (message.headers or {}) and await self._postpone(message, headers):
                continue
            delivery = RabbitMQDelivery(self, message, headers)
            self._unsettled.add(delivery)
            return delivery

    async def _postpone(self, message: AbstractIncomingMessage, headers: Mapping[str, str]) -> bool:
        """Send a message delayed past the cascade's maximum round again; True if it was."""
        due = _due_ms(message.headers or {})
        remaining = (due - time.time() * 1000) / 1000 if due is not None else 0.0
        if remaining <= 0:
            return False
        try:
            await self.transport.postpone(self.queue, headers, message.body, remaining)
        except TransportError as error:
            # Not sent round again: give it back, after a pause, so that a broker refusing
            # publishes does not make a hot loop of it.
            log.warning("%s: could not delay a message again (%s)", self.transport.url, error)
            await asyncio.sleep(1.0)
            await _quietly(message.nack(requeue=True))
            return True
        await _quietly(message.ack())
        return True

    def settled(self, delivery: RabbitMQDelivery) -> None:
        self._unsettled.discard(delivery)
        if self._stopping and not self._unsettled and self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close_channel())

    async def stop(self) -> None:
        """Stop consuming; give back what was received but not handed out.

        The channel stays open while handed-out deliveries are unsettled, so that they can still
        be acked; it closes with the last of them (or with the transport).
        """
        self._stopping = True
        if not self.transport.is_open:
            # Closing the connection gave everything back already.
            self.transport.forget(self)
            return
        queue, tag = self._amqp_queue, self._consumer_tag
        self._consumer_tag = None
        if queue is not None and tag is not None:
            await _quietly(queue.cancel(tag))
        while not self._buffer.empty():
            message = self._buffer.get_nowait()
            if message is not _CLOSED and _channel_alive(message):
                await _quietly(message.nack(requeue=True))
        if not self._unsettled:
            await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        self.transport.forget(self)
        if channel is not None and not channel.is_closed:
            await _quietly(channel.close())


async def _quietly(operation: Awaitable[object]) -> None:
    """Await an AMQP operation whose failure changes nothing: the channel or connection is gone,
    and with it every message it held went back to its queue."""
    task = asyncio.current_task()
    try:
        await operation
    except _SETTLE_ERRORS as error:
        log.debug("ignored on a lost channel: %r", error)
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise  # we are being cancelled
        # aiormq cancels what was pending on a channel that closed under it.


def _due_ms(headers: Mapping[str, Any]) -> int | None:
    value = headers.get(DUE_HEADER)
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    try:
        return int(value)
    except ValueError:
        return None
