"""Declaring on the broker what `topology` names: exchanges, queues, bindings.

Declarations go over one channel of their own, so that a refusal (a queue that exists with other
arguments closes the channel) never hits a publish in flight. Looking up a queue that may not
exist uses a throwaway channel (`channels.scratch_channel`), because a miss closes the channel it
was asked on. `transport` makes one `Declarations` and hands it the topology, a callable that
returns the open connection, and the values it needs; nothing here knows the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aio_pika import ExchangeType
from aio_pika.abc import (
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from aiormq.exceptions import ChannelAccessRefused

from tidings.errors import AccessRefused, NoRoute, TransportError
from tidings.transports.base import error_queue_of
from tidings.transports.rabbitmq.channels import scratch_channel, wait_until_open
from tidings.transports.rabbitmq.topology import DELAY_LEVELS, DelayKind, Topology

__all__ = ["Declarations"]

_T = TypeVar("_T")
_ERRORS = (AMQPError, ChannelInvalidStateError)


class Declarations:
    """The topology operations of one RabbitMQ transport.

    `connection` returns the transport's open connection, or raises `TransportClosed`; `url`
    names the broker in errors; `reopen_timeout` bounds the wait for the declaring channel while
    aio-pika reopens it (the transport's `publish_timeout`).
    """

    def __init__(
        self,
        topology: Topology,
        connection: Callable[[], AbstractRobustConnection],
        *,
        url: str,
        reopen_timeout: float,
    ) -> None:
        self._topology = topology
        self._connection = connection
        self._url = url
        self._reopen_timeout = reopen_timeout
        self._channel: AbstractRobustChannel | None = None
        # Queues known to exist: declared or looked up by this instance.
        self._known_queues: set[str] = set()
        # The queues this instance declared, by RabbitMQ name: binding through the same object
        # lets aio-pika restore a temporary queue's bindings after a reconnection.
        self._declared: dict[str, AbstractRobustQueue] = {}
        self._temporary: dict[str, bool] = {}
        self._delay_levels_declared = False
        self._delay_levels_lock = asyncio.Lock()

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Open the declaring channel and declare the exchanges every namespace has."""
        self._channel = channel = await connection.channel(publisher_confirms=False)
        topology = self._topology
        # Durable exchanges outlive the broker, so aio-pika need not declare them again after a
        # reconnection (robust=False); the same goes for durable queues and their bindings.
        for name, kind in (
            (topology.events_exchange, ExchangeType.TOPIC),
            (topology.commands_exchange, ExchangeType.DIRECT),
            (topology.errors_exchange, ExchangeType.DIRECT),
            (topology.delayed_exchange, ExchangeType.TOPIC),
        ):
            await self._declaring(channel.declare_exchange(name, kind, durable=True, robust=False))

    def close(self) -> None:
        """Forget everything learnt on the connection that closed."""
        self._channel = None
        self._known_queues.clear()
        self._declared.clear()
        self._temporary.clear()
        self._delay_levels_declared = False

    async def _declaring_channel(self) -> AbstractRobustChannel:
        self._connection()  # TransportClosed when closed
        assert self._channel is not None
        try:
            async with asyncio.timeout(self._reopen_timeout):
                await wait_until_open(self._channel, self._connection)
        except TimeoutError:
            raise TransportError(f"{self._url}: no channel to declare on") from None
        return self._channel

    async def _declaring(self, operation: Awaitable[_T]) -> _T:
        """Await a declaration, translating the broker's refusals."""
        url = self._url
        try:
            return await operation
        except ChannelPreconditionFailed as error:
            raise TransportError(
                f"{url}: RabbitMQ already has this with other settings (queue type, delivery "
                f"limit, exchange type); delete it or use the settings it was made with: {error}"
            ) from None
        except ChannelAccessRefused as error:
            raise AccessRefused(
                f"{url}: RabbitMQ refused a declaration (a missing permission): {error}"
            ) from None
        except _ERRORS as error:
            raise TransportError(f"{url}: declaring topology failed: {error}") from None

    async def declare_queue(self, queue: str, *, temporary: bool) -> None:
        channel = await self._declaring_channel()
        topology = self._topology
        # A temporary queue is exclusive to this connection: the broker deletes it when the
        # connection goes, so aio-pika must declare and bind it again after a reconnection
        # (robust=True).
        main = await self._declaring(
            channel.declare_queue(
                topology.queue(queue),
                durable=not temporary,
                exclusive=temporary,
                arguments=topology.queue_arguments(queue, temporary=temporary),
                robust=temporary,
            )
        )
        for exchange, key in (
            (topology.commands_exchange, queue),
            (topology.delayed_exchange, topology.delayed_binding(DelayKind.QUEUE, queue)),
        ):
            await self._declaring(main.bind(exchange, key, robust=temporary))
        await self._declare_error_queue(channel, queue, temporary=temporary)
        self._known_queues.update((topology.queue(queue), topology.error_queue(queue)))
        self._declared[topology.queue(queue)] = main
        self._temporary[topology.queue(queue)] = temporary

    async def declare_error_queue(self, queue: str) -> None:
        """Declare `queue`'s error queue and its bindings again (after an operator deleted it)."""
        channel = await self._declaring_channel()
        temporary = self._temporary.get(self._topology.queue(queue), False)
        await self._declare_error_queue(channel, queue, temporary=temporary)

    async def _declare_error_queue(
        self, channel: AbstractRobustChannel, queue: str, *, temporary: bool
    ) -> None:
        topology = self._topology
        errors = await self._declaring(
            channel.declare_queue(
                topology.error_queue(queue),
                durable=not temporary,
                exclusive=temporary,
                arguments=topology.error_queue_arguments(temporary=temporary),
                robust=temporary,
            )
        )
        for exchange, key in (
            (topology.errors_exchange, queue),
            # The error queue is an address like any other, as in the memory transport.
            (topology.commands_exchange, error_queue_of(queue)),
        ):
            await self._declaring(errors.bind(exchange, key, robust=temporary))

    async def queue_exists(self, physical: str) -> bool:
        """Whether RabbitMQ has the queue `physical`."""
        if physical in self._known_queues:
            return True
        try:
            async with scratch_channel(self._connection()) as channel:
                await channel.declare_queue(physical, passive=True)
        except ChannelNotFoundEntity:
            return False
        except _ERRORS as error:
            raise TransportError(f"{self._url}: cannot look up queue {physical}: {error}") from None
        self._known_queues.add(physical)
        return True

    async def _existing_queue(self, queue: str) -> tuple[AbstractQueue, bool]:
        """The queue, and whether aio-pika must restore its bindings after a reconnection."""
        physical = self._topology.queue(queue)
        if physical in self._declared:
            return self._declared[physical], self._temporary[physical]
        if not await self.queue_exists(physical):
            raise NoRoute(f"no queue {queue!r} ({physical}) at {self._url}")
        channel = await self._declaring_channel()
        return await channel.get_queue(physical, ensure=False), False

    async def bind(self, queue: str, event_type: str) -> None:
        amqp_queue, robust = await self._existing_queue(queue)
        topology = self._topology
        delayed = topology.delayed_binding(DelayKind.EVENT, event_type)
        for exchange, key in ((topology.events_exchange, event_type), (topology.delayed_exchange, delayed)):
            await self._declaring(amqp_queue.bind(exchange, key, robust=robust))  # type: ignore[call-arg]

    async def unbind(self, queue: str, event_type: str) -> None:
        try:
            amqp_queue, _ = await self._existing_queue(queue)
        except NoRoute:
            return  # no queue, no binding: done
        topology = self._topology
        delayed = topology.delayed_binding(DelayKind.EVENT, event_type)
        await self._declaring(amqp_queue.unbind(topology.events_exchange, event_type))
        await self._declaring(amqp_queue.unbind(topology.delayed_exchange, delayed))

    async def declare_delay_levels(self) -> None:
        """Declare the delay cascade, once per connection and only when first needed."""
        if self._delay_levels_declared:
            return
        async with self._delay_levels_lock:
            if self._delay_levels_declared:
                return
            channel = await self._declaring_channel()
            topology = self._topology
            for level in range(DELAY_LEVELS):
                name = topology.delay_level(level)
                await self._declaring(
                    channel.declare_exchange(name, ExchangeType.TOPIC, durable=True, robust=False)
                )
                amqp_queue = await self._declaring(
                    channel.declare_queue(
                        name,
                        durable=True,
                        arguments=topology.delay_queue_arguments(level),
                        robust=False,
                    )
                )
                into_queue, onward = topology.delay_level_bindings(level)
                await self._declaring(amqp_queue.bind(name, into_queue, robust=False))
                # An exchange-to-exchange binding: aio-pika would want exchange objects for it.
                underlay = await channel.get_underlay_channel()
                await self._declaring(
                    underlay.exchange_bind(
                        destination=topology.delay_level_target(level),
                        source=name,
                        routing_key=onward,
                    )
                )
            self._delay_levels_declared = True
