"""Consuming from RabbitMQ: one channel per `receive()`, its prefetch as `basic.qos`, manual acks.

The channel is an aio-pika robust channel: after a lost connection it reopens and sets the prefetch
again, and the consumer starts consuming on the new channel (`reopen_callbacks`). The consumer
itself is registered with aiormq, under aio-pika: aio-pika's message objects would only repackage
what aiormq hands over, at a cost per message. Settling goes through the channel's `ChannelAcks`
(`acks`): once per delivery tag, without waiting for the socket to drain. Deliveries
that arrived on a lost channel are void (the broker has already put them back); those not yet
handed out are dropped, and settling one already handed out does nothing, because the broker
redelivers it anyway.

`transport` makes a `Consumer` for each `receive()` and hands it the transport's publishing
operations a settlement needs (a copy back to the queue, into the error queue, round the delay
cascade again), whether the transport is still open, and how to unregister; nothing here knows
the transport.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from tidings.errors import TransportClosed, TransportError
from tidings.faults import fault_headers
from tidings.logs import logger
from tidings.transports.base import Delivery
from tidings.transports.rabbitmq.acks import LOST_CHANNEL_ERRORS, ChannelAcks
from tidings.transports.rabbitmq.channels import refused
from tidings.transports.rabbitmq.codec import DUE_HEADER, decode_headers

__all__ = ["Consumer", "RabbitMQDelivery"]

log = logger("tidings.transports.rabbitmq")

# What the buffer holds: a message and the settlements of the channel it came on; or the
# receiver's cue that the transport closed (None), or that consuming failed (an error).
_Item = tuple[DeliveredMessage, ChannelAcks] | TransportError | None

#: A confirmed publish of a received message's copy: `(queue, headers, body, delay)`.
_Republish = Callable[[str, Mapping[str, str], bytes, float], Awaitable[None]]

#: The fault reason of a message with a header tidings reads but cannot make sense of.
BAD_HEADER = "bad-header"
#: How long a delivery whose copy could not be stored waits before it goes back to its queue: a
#: broker that refuses at once (a missing permission) would otherwise make a hot loop of it.
GIVE_BACK_PAUSE = 1.0
#: The latest due time `x-tidings-due` may name (9999-12-31, in ms since the epoch).
_MAX_DUE_MS = 253_402_300_799_999

# How RabbitMQ closes a channel whose delivery stayed unacknowledged past its consumer_timeout.
_CONSUMER_TIMEOUT = re.compile(r"delivery acknowledgement on channel \d+ timed out(?:.*?(\d+) ms)?", re.S)


class BadHeader(ValueError):
    """A header that tidings reads (not merely passes on) has a value it cannot use."""


def _delivery_count(message: DeliveredMessage, headers: Mapping[str, Any]) -> int:
    # Quorum queues count earlier deliveries; RabbitMQ 4.3 counts them as x-acquired-count, as
    # x-delivery-count only the failed ones. Classic queues only say "not the first time".
    for key in ("x-acquired-count", "x-delivery-count"):
        earlier = headers.get(key)
        if isinstance(earlier, int) and not isinstance(earlier, bool):
            # A foreign publisher can set these on a classic queue: never below the first.
            return earlier + 1 if earlier >= 0 else 1
    return 2 if message.redelivered else 1


class RabbitMQDelivery(Delivery):
    """A message received on a consumer's channel, settled on that channel."""

    __slots__ = ("_acks", "_consumer", "_settled", "_tag")

    def __init__(
        self,
        consumer: Consumer,
        message: DeliveredMessage,
        acks: ChannelAcks,
        headers: Mapping[str, str],
        amqp_headers: Mapping[str, Any],
    ) -> None:
        self.headers = headers
        self.body = message.body
        self.delivery_count = _delivery_count(message, amqp_headers)
        self._consumer = consumer
        self._acks = acks
        self._tag: int = message.delivery_tag or 0
        self._settled = False

    async def ack(self) -> None:
        await self._settle(self._acks.ack)

    async def release(self) -> None:
        await self._settle(self._acks.nack)

    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        requeue_copy = self._consumer.requeue_copy
        await self._settle(
            self._acks.ack,
            first=lambda: requeue_copy(self._consumer.queue, headers, self.body, delay),
        )

    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        store_dead_letter = self._consumer.store_dead_letter
        await self._settle(
            self._acks.ack,
            first=lambda: store_dead_letter(self._consumer.queue, headers, self.body),
        )

    async def _settle(
        self,
        settle: Callable[[int], Awaitable[None]],
        *,
        first: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if self._settled:
            return
        if not self._acks.is_open:
            # The broker took the message back when the channel went: it comes again, with a
            # higher delivery count. Publishing a copy now would only make a duplicate.
            # In a broker outage the transport said so once; each delivery it cut off is detail.
            level = logging.DEBUG if self._consumer.in_outage() else logging.WARNING
            log.log(level, "%s: delivery from a lost channel not settled; it will be redelivered",
                    self._consumer.url)  # fmt: skip
            self._finish()
            return
        if first is not None:
            try:
                await first()
            except BaseException as error:
                # The copy was not stored (no confirm during an alarm, no permission, no error
                # queue): the message goes back to its queue. Left unsettled on this live
                # channel it would hold a prefetch slot until the connection goes, and `prefetch`
                # of them would stop the consumer.
                self._finish()
                await self._consumer.give_back(self._acks, self._tag, error)
                raise
            self._consumer.copy_stored()
        await settle(self._tag)
        self._finish()

    def _finish(self) -> None:
        self._settled = True
        self._consumer.settled(self)


class Consumer:
    """The state behind one `receive()` call.

    What it gets from the transport: `url` names the broker in logs and errors; `requeue_copy`
    (a delivery's `retry_later`: the copy goes back to the queue after a delay), `store_dead_letter`
    (a delivery's `dead_letter`: the copy goes into the error queue, no delay) and `postpone` (a
    message delayed past the cascade's maximum goes round it again) publish with a confirm, and
    raise if there is none; `is_open` says whether the transport is still open; `forget` takes
    this consumer off the transport's list once its channel is done with.
    """

    def __init__(
        self,
        queue: str,
        prefetch: int,
        *,
        url: str,
        requeue_copy: _Republish,
        store_dead_letter: Callable[[str, Mapping[str, str], bytes], Awaitable[None]],
        postpone: _Republish,
        is_open: Callable[[], bool],
        forget: Callable[[Consumer], None],
        in_outage: Callable[[], bool] = lambda: False,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        self.url = url
        self.requeue_copy = requeue_copy
        self.store_dead_letter = store_dead_letter
        self.postpone = postpone
        self._is_open = is_open
        self._forget = forget
        self.in_outage = in_outage
        self.queue = queue
        self.prefetch = prefetch
        self._buffer: asyncio.Queue[_Item] = asyncio.Queue()
        self._unsettled: set[RabbitMQDelivery] = set()
        self._channel: AbstractRobustChannel | None = None
        self._physical_queue = ""
        # The aiormq channel consumed on now, with its consumer tag and its settlements.
        self._underlay: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._acks: ChannelAcks | None = None
        self._stopping = False
        self._closing: asyncio.Task[None] | None = None
        # Settlements in a row whose copy could not be stored: logged once per episode.
        self._failed_copies = 0

    async def start(self, channel: AbstractRobustChannel, physical_queue: str) -> None:
        self._channel = channel
        self._physical_queue = physical_queue
        await channel.set_qos(prefetch_count=self.prefetch)  # restored by aio-pika on reopen
        # A passive declare that aio-pika repeats when it reopens the channel: a temporary queue
        # comes back with the connection's other channels, and aio-pika puts this channel off
        # until the queue is there again, so consuming starts again only then.
        await channel.declare_queue(physical_queue, passive=True)
        await self._consume()
        channel.reopen_callbacks.add(self._on_reopen)

    async def _consume(self) -> None:
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        acks = ChannelAcks(underlay)

        async def on_message(message: DeliveredMessage) -> None:
            await self._on_message(message, acks)

        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        underlay.closing.add_done_callback(self._on_channel_closed)
        self._underlay, self._acks = underlay, acks
        consumed = await underlay.basic_consume(self._physical_queue, on_message)
        self._consumer_tag = consumed.consumer_tag

    async def _on_reopen(self, _channel: object) -> None:
        if self._stopping:
            return
        task = asyncio.current_task()
        try:
            await self._consume()
        except LOST_CHANNEL_ERRORS as error:
            if self._refused(error):
                self._buffer.put_nowait(TransportError(
                    f"{self.url}: cannot consume from {self._physical_queue} again: {error}"
                ))  # fmt: skip
                return
            # The connection went again while consuming started again (a network that flaps).
            # Not the receiver's business: aio-pika connects anew, reopens the channel and calls
            # this once more. Ending `receive()` here would end the bus's run() for good.
            log.debug("%s: consuming from %s again was cut off (%r); again on the next reopen",
                      self.url, self._physical_queue, error)  # fmt: skip
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise
            # aiormq cancelled the basic.consume of a channel that closed under it: as above.
            log.debug("%s: consuming from %s again was cut off; again on the next reopen",
                      self.url, self._physical_queue)  # fmt: skip

    def _refused(self, error: BaseException) -> bool:
        """Whether the broker refused the consumer (that ends `receive()`; a lost connection or
        channel does not)."""
        return refused(error, self._underlay.connection if self._underlay is not None else None)

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        """Say so when the broker's consumer_timeout took deliveries back from a slow handler."""
        error = None if closing.cancelled() else closing.exception()
        found = _CONSUMER_TIMEOUT.search(str(error)) if error is not None else None
        if found is None:
            return
        limit = f"{int(found.group(1)) / 1000:g} s" if found.group(1) else "its limit"
        # aio-pika reopens the channel and the consumer subscribes again (_on_reopen); the messages
        # come again, and the inbox makes a repeat of a finished handler a duplicate. But every
        # such handler is run twice, and a handler that always takes longer never gets through.
        log.warning(
            "%s: RabbitMQ took back the deliveries of %s: a handler ran longer than the broker's "
            "consumer_timeout (%s); they come again. Raise consumer_timeout above the longest "
            "handler (docs/rabbitmq.md)",
            self.url,
            self._physical_queue,
            limit,
            extra={"consumer_timeout": limit},
        )

    def _on_cancel(self, frame: Basic.Cancel) -> None:
        # The broker ended the consumer (its queue was deleted): tell the receiver.
        if frame.consumer_tag == self._consumer_tag and not self._stopping:
            self._buffer.put_nowait(TransportError(
                f"{self.url}: RabbitMQ cancelled the consumer of {self._physical_queue}"
            ))  # fmt: skip

    async def _on_message(self, message: DeliveredMessage, acks: ChannelAcks) -> None:
        tag = message.delivery_tag or 0
        acks.received(tag)
        if self._stopping:
            # Arrived after stop() emptied the buffer: nobody will take it, so give it back.
            await acks.nack(tag)
            return
        self._buffer.put_nowait((message, acks))

    def wake(self) -> None:
        """The transport closed: make the receiver stop waiting."""
        self._buffer.put_nowait(None)

    async def next(self) -> RabbitMQDelivery:
        """The next delivery; `TransportClosed` once the transport closed."""
        while True:
            item = await self._buffer.get()
            if item is None:
                self._buffer.put_nowait(None)  # every later call raises too
                raise TransportClosed(f"{self.url} is closed")
            if isinstance(item, TransportError):
                raise item
            message, acks = item
            if not acks.is_open:
                continue  # void: the broker put it back when the channel was lost
            # Whatever a foreign publisher put in the headers is that message's fault alone: it
            # goes to the error queue, and the loop goes on (nothing here may end `receive()`).
            try:
                properties = message.header.properties
                amqp_headers = properties.headers or {}
                headers = decode_headers(
                    amqp_headers,
                    content_type=properties.content_type,
                    message_id=properties.message_id,
                )
                due = _due_ms(amqp_headers) if DUE_HEADER in amqp_headers else None
                delivery = RabbitMQDelivery(self, message, acks, headers, amqp_headers)
            except Exception as error:
                await self._refuse(message, acks, error)
                continue
            if due is not None and await self._postpone(message, acks, headers, due):
                continue
            self._unsettled.add(delivery)
            return delivery

    async def _refuse(self, message: DeliveredMessage, acks: ChannelAcks, error: Exception) -> None:
        """Dead-letter a message whose headers cannot be read (`bad-header`), then ack it."""
        tag = message.delivery_tag or 0
        detail = f"{type(error).__name__}: {error}"
        log.warning("%s: a message in %s has a header tidings cannot read (%s); to the error queue",
                    self.url, self._physical_queue, detail[:200])  # fmt: skip
        headers = fault_headers(
            _salvaged_headers(message),
            reason=BAD_HEADER,
            service=self.queue,
            queue=self.queue,
            attempts=0,
            detail=detail,
        )
        try:
            await self.store_dead_letter(self.queue, headers, message.body)
        except BaseException as failure:
            await self.give_back(acks, tag, failure)
            if not isinstance(failure, Exception):
                raise
            return
        self.copy_stored()
        await acks.ack(tag)

    async def give_back(self, acks: ChannelAcks, tag: int, error: BaseException) -> None:
        """A settlement's copy was not stored: put the delivery back on its queue (nack).

        After a pause, unless cancelled: the broker may well refuse the next copy at once too.
        The first failure of an episode is a warning, the rest debug, the end of it info.
        """
        self._failed_copies += 1
        if self._failed_copies == 1:
            log.warning("%s: could not store a copy to settle a message from %s (%s); such "
                        "messages go back to the queue until it works again",
                        self.url, self._physical_queue, error)  # fmt: skip
        else:
            log.debug("%s: copy not stored, message back to %s: %r", self.url, self._physical_queue, error)
        if isinstance(error, Exception):
            try:
                await asyncio.sleep(GIVE_BACK_PAUSE)
            finally:
                await acks.nack(tag)  # even when cancelled in the pause
        else:
            await acks.nack(tag)

    def copy_stored(self) -> None:
        """A settlement's copy was stored: the end of an episode of failures, if there was one."""
        if self._failed_copies:
            log.info("%s: settling messages of %s works again (%d failed meanwhile)",
                     self.url, self._physical_queue, self._failed_copies)  # fmt: skip
            self._failed_copies = 0

    async def _postpone(
        self,
        message: DeliveredMessage,
        acks: ChannelAcks,
        headers: Mapping[str, str],
        due: int,
    ) -> bool:
        """Send a message delayed past the cascade's maximum round again; True if it was."""
        remaining = (due - time.time() * 1000) / 1000
        if remaining <= 0:
            return False
        tag = message.delivery_tag or 0
        try:
            await self.postpone(self.queue, headers, message.body, remaining)
        except TransportError as error:
            # Not sent round again: give it back, after a pause, so that a broker refusing
            # publishes does not make a hot loop of it.
            log.warning("%s: could not delay a message again (%s)", self.url, error)
            await asyncio.sleep(1.0)
            await acks.nack(tag)
            return True
        await acks.ack(tag)
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
        if self._channel is not None:
            self._channel.reopen_callbacks.discard(self._on_reopen)
        if not self._is_open():
            # Closing the connection gave everything back already.
            self._forget(self)
            return
        underlay, tag = self._underlay, self._consumer_tag
        self._consumer_tag = None
        if underlay is not None and tag is not None and not underlay.is_closed:
            await _quietly(underlay.basic_cancel(tag))
        while not self._buffer.empty():
            item = self._buffer.get_nowait()
            if isinstance(item, tuple):
                message, acks = item
                await acks.nack(message.delivery_tag or 0)
        if not self._unsettled:
            await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._forget(self)
        if channel is not None and not channel.is_closed:
            await _quietly(channel.close())


async def _quietly(operation: Awaitable[object]) -> None:
    """Await an AMQP operation whose failure changes nothing: the channel or connection is gone,
    and with it every message it held went back to its queue."""
    task = asyncio.current_task()
    try:
        await operation
    except LOST_CHANNEL_ERRORS as error:
        log.debug("ignored on a lost channel: %r", error)
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise  # we are being cancelled
        # aiormq cancels what was pending on a channel that closed under it.


def _due_ms(headers: Mapping[str, Any]) -> int:
    """The due time in `x-tidings-due` (ms since the epoch); `BadHeader` unless it is one."""
    value = headers.get(DUE_HEADER)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", errors="replace")
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)  # at most 20 digits: never a costly conversion
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_DUE_MS:
        raise BadHeader(f"{DUE_HEADER} is not a time in ms since the epoch: {str(value)[:60]!r}")
    return value


def _salvaged_headers(message: DeliveredMessage) -> dict[str, str]:
    """What can be kept of an unreadable message's headers: its text values, its id."""
    try:
        properties = message.header.properties
        raw = properties.headers if isinstance(properties.headers, dict) else {}
        headers = {
            key: value
            for key, value in raw.items()
            if isinstance(key, str) and isinstance(value, str) and key != DUE_HEADER
        }
        headers = decode_headers(headers, content_type=None, message_id=None)
        if isinstance(properties.message_id, str) and "id" not in headers:
            headers["id"] = properties.message_id
    except Exception:  # nothing of it can be read: the body alone is kept
        return {}
    return headers
