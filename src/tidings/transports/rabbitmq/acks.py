"""The settlements of one consuming channel.

Delivery tags belong to one channel: a channel that reopened after a lost connection gets a new
`ChannelAcks`, and settling a delivery of the old one does nothing, because the broker put those
messages back when the channel went. A tag is settled at most once: a second ack of the same tag
is a channel error in AMQP, which would close the channel and give back every message on it.
Frames are queued without waiting for the socket to drain: an ack has no answer to wait for, and
one lost with the connection only means the message is delivered again.
"""

from __future__ import annotations

from aiormq.abc import AbstractChannel
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from tidings.logs import logger

__all__ = ["LOST_CHANNEL_ERRORS", "ChannelAcks"]

log = logger("tidings.transports.rabbitmq")

#: What an operation on a channel raises once that channel or its connection is gone.
LOST_CHANNEL_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)


class ChannelAcks:
    """Settles the deliveries of one aiormq channel."""

    __slots__ = ("_channel", "_unsettled")

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._unsettled: set[int] = set()

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    def received(self, tag: int) -> None:
        self._unsettled.add(tag)

    async def ack(self, tag: int) -> None:
        """The message is done with."""
        if self._take(tag):
            try:
                await self._channel.basic_ack(tag, wait=False)
            except LOST_CHANNEL_ERRORS as error:
                log.warning("could not ack on a lost channel (%r); the broker redelivers", error)

    async def nack(self, tag: int) -> None:
        """Give the message back to its queue now."""
        if self._take(tag):
            try:
                # nack, not reject: from RabbitMQ 4.3 on a nack does not count towards the
                # delivery limit, and giving a message back is not the message's fault.
                await self._channel.basic_nack(tag, requeue=True, wait=False)
            except LOST_CHANNEL_ERRORS as error:
                log.debug("nack on a lost channel (the broker puts it back): %r", error)

    def _take(self, tag: int) -> bool:
        try:
            self._unsettled.remove(tag)
        except KeyError:
            return False  # settled already, or never ours
        return True
