"""The RabbitMQ transport (`amqp://`, `amqps://`), on aio-pika's robust connection.

Every publish is persistent and waits for the broker's confirm; many publishes can be in flight
on the one publishing channel at once, so concurrent callers are confirmed in a pipeline. Each
`receive()` consumes on a channel of its own with manual acks. After a lost connection aio-pika
reconnects and reopens the channels, and each consumer starts again on its reopened channel
(`consumer`); a publish waits for that (up to `publish_timeout`), and a publish that was in
flight when the connection went (or got no confirm in time) raises `PublishNotConfirmed`, to be
published again by the caller; a message the broker nacks raises `PublishRefused`. The topology
is in `topology` and docs/rabbitmq.md.

This module is the top of the package: it owns the connection and the publishing channel, and
hands `Declarations`, `ErrorQueues` and each `Consumer` the callables and values they need
(`connection`, `send_now`, ...), so that none of them imports it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelInvalidStateError,
    DeliveryError,
    InvalidFrameError,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.abc import AbstractConnection
from aiormq.exceptions import ChannelAccessRefused

from tidings.envelope import Envelope
from tidings.errors import (
    AccessRefused,
    ConnectionFailed,
    NoRoute,
    PublishNotConfirmed,
    PublishRefused,
    TidingsError,
    TransportClosed,
    TransportError,
)
from tidings.logs import LibraryToDebug, Outage, logger
from tidings.transports.base import DeadLetter, Delivery, Transport
from tidings.transports.rabbitmq.channels import refused, wait_until_open
from tidings.transports.rabbitmq.codec import DUE_HEADER, OutgoingMessage, encode_message
from tidings.transports.rabbitmq.consumer import Consumer
from tidings.transports.rabbitmq.declarations import Declarations
from tidings.transports.rabbitmq.error_queues import ErrorQueues
from tidings.transports.rabbitmq.failover import FailoverConnection
from tidings.transports.rabbitmq.properties import decode_leniently
from tidings.transports.rabbitmq.settings import RabbitMQSettings, redact_url
from tidings.transports.rabbitmq.tls import TLSSettings, describe_tls_error
from tidings.transports.rabbitmq.topology import (
    MAX_DELAY_MS,
    DelayKind,
    Topology,
)

__all__ = ["RabbitMQTransport"]

log = logger("tidings.transports.rabbitmq")

# Before any connection reads a frame: a foreign publisher's odd property (a timestamp past 9999,
# a string that is not UTF-8) must not make pamqp refuse the frame and close the connection.
decode_leniently()


class _FirstConnection:
    """One `open()`'s first connection attempt; `over` once it has succeeded or failed."""

    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False


# Set while open() makes its first connection. aio-pika and aiormq log that attempt's failure
# ("error when creating transport", "Connection ... closed. Reconnecting after 1 seconds") though
# fail_fast raises it to open() and nothing reconnects: open()'s ConnectionFailed says it once.
# The tasks the attempt starts copy this context; the flag object is shared, so their records
# after the attempt (a later reconnection's) pass again.
_first_connection: ContextVar[_FirstConnection | None] = ContextVar("tidings_first_connection", default=None)


class _QuietFirstConnection(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        attempt = _first_connection.get()
        return attempt is None or attempt.over


for _logger in ("aio_pika.robust_connection", "aiormq.connection"):
    logging.getLogger(_logger).addFilter(_QuietFirstConnection())

# Every aio-pika and aiormq logger (all exist once aio_pika is imported): their reconnection
# warnings and tracebacks go to DEBUG; the transport's `Outage` says once what happened.
for _name in list(logging.root.manager.loggerDict):
    if _name.split(".")[0] in ("aio_pika", "aiormq"):
        logging.getLogger(_name).addFilter(LibraryToDebug())


class RabbitMQTransport(Transport):
    """A transport on a RabbitMQ broker. Make it with `from_url`, then open it."""

    def __init__(self, settings: RabbitMQSettings, *, url: str | None = None) -> None:
        self.settings = settings
        self.topology = Topology(settings)
        self.url = redact_url(url) if url is not None else settings.redacted_url
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._publisher_renewed = -math.inf  # when a nack last had the channel replaced
        self._renewals: set[asyncio.Task[None]] = set()
        self._consumers: set[Consumer] = set()
        self._opening = asyncio.Lock()
        # A lost connection is one WARNING, its return one INFO with the duration (aio-pika
        # reconnects in the background; everything on the way waits or goes back meanwhile).
        self.outage = Outage(log, f"RabbitMQ at {self.url}")
        self._declarations = Declarations(
            self.topology, self.connection, url=self.url, reopen_timeout=settings.publish_timeout
        )
        self._error_queues = ErrorQueues(
            self.topology,
            self.connection,
            self._declarations.queue_exists,
            self.send_now,
            url=self.url,
        )

    @classmethod
    def from_url(
        cls, url: str, *, tls: TLSSettings | None = None, require_tls: bool = False
    ) -> RabbitMQTransport:
        """A transport for `url`; `ConnectionFailed` at once if the URL is unusable (or, with
        `require_tls`, not `amqps://`). `tls` replaces the URL's TLS options."""
        return cls(RabbitMQSettings.from_url(url, tls=tls, require_tls=require_tls), url=url)

    # -- connection ---------------------------------------------------------------------------

    def connection(self) -> AbstractRobustConnection:
        """The open connection; `TransportClosed` if there is none."""
        if self._connection is None:
            raise TransportClosed(f"{self.url} is not open")
        return self._connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    @property
    def in_outage(self) -> bool:
        return self.outage.ongoing

    async def open(self) -> None:
        async with self._opening:  # two concurrent open() calls make one connection
            if self._connection is None:
                await self._connect()

    async def _connect(self) -> None:
        # The nodes in order (one, unless the URL lists a cluster's): the first that answers is
        # kept, and after losing it the connection goes on to the next (`FailoverConnection`).
        urls = self.settings.broker_urls
        tls = None if not self.settings.uses_tls else (self.settings.tls or TLSSettings()).context()
        failures: list[BaseException] = []
        for first in range(len(urls)):
            try:
                connection = await self._connect_to(urls, first, tls)
            except ConnectionFailed as error:
                failures.append(error)
                continue
            self._connection = connection
            self._watch(connection)
            return
        if len(failures) == 1:
            raise failures[0]
        raise ConnectionFailed(
            f"no node of {self.url} could be connected to: " + "; ".join(map(str, failures))
        )

    async def _connect_to(
        self, urls: Sequence[str], first: int, tls: ssl.SSLContext | None
    ) -> AbstractRobustConnection:
        timeout = self.settings.connect_timeout
        connection = FailoverConnection(
            urls,
            first=first,
            ssl_context=tls,
            # fail_fast: a first connection that fails raises instead of retrying in the
            # background; later losses are retried every reconnect_interval, never in a hot loop.
            fail_fast=True,
            reconnect_interval=self.settings.reconnect_interval,
            client_properties={"connection_name": f"tidings {self.settings.namespace}"},
        )
        attempt = _FirstConnection()
        quiet = _first_connection.set(attempt)
        try:
            async with asyncio.timeout(timeout):
                await connection.connect(timeout=timeout)
                self._publisher = await connection.channel(on_return_raises=True)
                await self._declarations.open(connection)
        except BaseException as error:
            await _close_quietly(connection)
            raise self._connection_error(error, timeout, redact_url(urls[first])) from None
        finally:
            attempt.over = True
            _first_connection.reset(quiet)
        return connection

    def _watch(self, connection: AbstractRobustConnection) -> None:
        """Log the connection's losses and returns (not its closing by `close()`)."""

        def lost(_: object, error: BaseException | None = None) -> None:
            if self._connection is connection and not isinstance(error, asyncio.CancelledError):
                self.outage.down(error or "the connection closed")

        def back(_: object) -> None:
            if self._connection is connection:
                self.outage.up()

        connection.close_callbacks.add(lost)
        connection.reconnect_callbacks.add(back)

    def _connection_error(self, error: BaseException, timeout: float, url: str) -> BaseException:
        if isinstance(error, TimeoutError):
            return ConnectionFailed(f"no answer from RabbitMQ at {url} within {timeout:g} s")
        if isinstance(error, AuthenticationError | ProbableAuthenticationError):
            return ConnectionFailed(
                f"RabbitMQ at {url} refused the credentials (check user, password, vhost): {error}"
            )
        tls_problem = describe_tls_error(
            error, (self.settings.tls or TLSSettings()) if self.settings.uses_tls else None
        )
        if tls_problem is not None:
            return ConnectionFailed(f"TLS with RabbitMQ at {url} failed: {tls_problem}")
        if isinstance(error, InvalidFrameError) and "Connection.Close" in str(error):
            # The broker closed the connection instead of opening the vhost (aiormq reports
            # only the frame's type, not its text): it does not exist or the user may not use it.
            vhost, user = self.settings.vhost, self.settings.user
            return ConnectionFailed(
                f"RabbitMQ at {url} refused vhost {vhost!r}: it does not exist, or user {user!r} "
                f"has no permission on it (rabbitmqctl list_vhosts; list_permissions -p {vhost})"
            )
        if isinstance(error, TidingsError | asyncio.CancelledError):
            return error
        if isinstance(error, AMQPError | OSError | RuntimeError):
            return ConnectionFailed(f"cannot connect to RabbitMQ at {url}: {error}")
        return error

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        for consumer in list(self._consumers):
            consumer.wake()
        # Closing the connection gives every unsettled delivery back to its queue and deletes the
        # exclusive (temporary) queues.
        await _close_quietly(connection)
        for renewal in list(self._renewals):
            renewal.cancel()
        self._publisher = None
        self._declarations.close()

    def _renew_publisher_after_nack(self) -> None:
        """Replace the publishing channel after a nack, at most once per `reconnect_interval`.

        RabbitMQ 3.10 can wedge a channel opened while a quorum queue elects a new leader (the
        channel a failover to another node opens): it nacks every later publish to that queue,
        for as long as the channel lives, though a new channel publishes fine
        (tests/cluster/test_node_loss.py). A real refusal (a queue over its length limit) costs
        only a new channel per interval; publishes in flight on the old one are not confirmed,
        and published again by their callers.
        """
        now = time.monotonic()
        if now - self._publisher_renewed < self.settings.reconnect_interval:
            return
        self._publisher_renewed = now
        task = asyncio.get_running_loop().create_task(self._renew_publisher())
        self._renewals.add(task)
        task.add_done_callback(self._renewals.discard)

    async def _renew_publisher(self) -> None:
        connection, old = self._connection, self._publisher
        if connection is None or old is None:
            return
        try:
            fresh = await connection.channel(on_return_raises=True)
        except (AMQPError, ChannelInvalidStateError, OSError, RuntimeError) as error:
            log.debug("%s: no new publishing channel after a nack: %r", self.url, error)
            return
        if self._connection is not connection:  # closed meanwhile
            await _close_quietly(fresh)
            return
        self._publisher = fresh
        await _close_quietly(old)

    # -- topology (see declarations) ----------------------------------------------------------

    async def declare_queue(self, queue: str, *, temporary: bool = False) -> None:
        await self._declarations.declare_queue(queue, temporary=temporary)

    async def bind(self, queue: str, event_type: str) -> None:
        await self._declarations.bind(queue, event_type)

    async def unbind(self, queue: str, event_type: str) -> None:
        await self._declarations.unbind(queue, event_type)

    async def queue_exists(self, physical: str) -> bool:
        """Whether RabbitMQ has the queue named `physical` (a RabbitMQ name, not the port's)."""
        return await self._declarations.queue_exists(physical)

    # -- publishing ---------------------------------------------------------------------------

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        message: OutgoingMessage,
        *,
        no_route: Callable[[], TidingsError] | None = None,
    ) -> None:
        """Publish with a confirm; `no_route`, if given, makes it mandatory and names the error."""
        self.connection()
        channel = self._publisher
        assert channel is not None
        timeout = self.settings.publish_timeout
        task = asyncio.current_task()
        try:
            async with asyncio.timeout(timeout):
                # While aio-pika reconnects, the channel is closed: wait for it to come back.
                await wait_until_open(channel, self.connection)
                # aiormq directly: aio-pika's Message and Exchange would only wrap the same call.
                underlay = await channel.get_underlay_channel()
                await underlay.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=no_route is not None,
                )
        except PublishError:
            assert no_route is not None
            raise no_route() from None
        except TimeoutError:
            raise PublishNotConfirmed(
                f"{self.url}: no confirm for a message to {exchange!r} within {timeout:g} s"
            ) from None
        except DeliveryError as error:
            # A nack: the broker's verdict on this message, not a failing connection.
            self._renew_publisher_after_nack()
            raise PublishRefused(f"{self.url}: RabbitMQ refused a message to {exchange!r}: {error}") from None
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as error:
            raise PublishNotConfirmed(
                f"{self.url}: connection lost before the confirm of a message to {exchange!r}: {error!r}"
            ) from None
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise  # the caller was cancelled
            # aiormq cancelled the confirm because the channel closed under it.
            raise PublishNotConfirmed(
                f"{self.url}: connection lost before the confirm of a message to {exchange!r}"
            ) from None

    async def _publish_delayed(
        self, message: OutgoingMessage, delay: float, kind: DelayKind, destination: str
    ) -> None:
        delay_ms = math.ceil(delay * 1000)  # never early
        if delay_ms > MAX_DELAY_MS:
            # Past the cascade's reach: it makes the longest round and the consumer sends it
            # round again (see Consumer._postpone) until the due time has come.
            due = math.ceil(time.time() * 1000) + delay_ms
            message.properties.headers = {**(message.properties.headers or {}), DUE_HEADER: str(due)}
            delay_ms = MAX_DELAY_MS
        await self._declarations.declare_delay_levels()
        exchange, routing_key = self.topology.delayed_route(delay_ms, kind, destination)
        await self._publish(
            exchange,
            routing_key,
            message,
            no_route=lambda: TransportError(f"{self.url}: the delay queues are missing"),
        )

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        message = encode_message(envelope.to_headers(), envelope.body)
        delay = _seconds_until(not_before)
        if delay > 0:
            self.connection()
            await self._publish_delayed(message, delay, DelayKind.EVENT, envelope.type)
        else:
            await self._publish(self.topology.events_exchange, envelope.type, message)

    async def send(self, envelope: Envelope, queue: str, *, not_before: datetime | None = None) -> None:
        message = encode_message(envelope.to_headers(), envelope.body)
        delay = _seconds_until(not_before)
        if delay > 0:
            if not await self.queue_exists(self.topology.queue(queue)):
                raise NoRoute(f"no queue {queue!r} at {self.url}")
            await self._publish_delayed(message, delay, DelayKind.QUEUE, queue)
        else:
            await self.send_now(message, queue)

    async def send_now(self, message: OutgoingMessage, queue: str) -> None:
        await self._publish(
            self.topology.commands_exchange,
            queue,
            message,
            no_route=lambda: NoRoute(f"no queue {queue!r} at {self.url}"),
        )

    async def requeue_copy(self, queue: str, headers: Mapping[str, str], body: bytes, delay: float) -> None:
        """A delivery's `retry_later`: its copy goes back to `queue` after `delay` seconds."""
        message = encode_message(headers, body)
        if delay > 0:
            await self._publish_delayed(message, delay, DelayKind.QUEUE, queue)
        else:
            await self.send_now(message, queue)

    async def store_dead_letter(self, queue: str, headers: Mapping[str, str], body: bytes) -> None:
        """A delivery's `dead_letter`: its copy goes into `queue`'s error queue.

        An error queue that is gone (an operator deleted it) is declared again, as `declare_queue`
        would at the next start: the copy then has somewhere to go, instead of the message
        going back to its queue again and again.
        """
        message = encode_message(headers, body)

        def no_route() -> NoRoute:
            return NoRoute(f"no error queue for {queue!r} at {self.url}")

        try:
            await self._publish(self.topology.errors_exchange, queue, message, no_route=no_route)
        except NoRoute:
            log.warning("%s: the error queue %s is gone; declaring it again",
                        self.url, self.topology.error_queue(queue))  # fmt: skip
            await self._declarations.declare_error_queue(queue)
            await self._publish(self.topology.errors_exchange, queue, message, no_route=no_route)

    async def postpone(self, queue: str, headers: Mapping[str, str], body: bytes, delay: float) -> None:
        """Send a received message round the delay cascade again (see `_publish_delayed`)."""
        # Built afresh from the flat map: a copy of the broker's x-death headers would make
        # RabbitMQ take the second round for a dead-letter cycle and drop the message.
        await self._publish_delayed(encode_message(headers, body), delay, DelayKind.QUEUE, queue)

    # -- consuming ----------------------------------------------------------------------------

    async def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        connection = self.connection()
        physical = self.topology.queue(queue)
        if not await self.queue_exists(physical):
            raise NoRoute(f"no queue {queue!r} ({physical}) at {self.url}")
        consumer = Consumer(
            queue,
            prefetch,
            url=self.url,
            requeue_copy=self.requeue_copy,
            store_dead_letter=self.store_dead_letter,
            postpone=self.postpone,
            is_open=lambda: self.is_open,
            forget=self._consumers.discard,
            in_outage=lambda: self.in_outage,
        )
        self._consumers.add(consumer)
        try:
            await self._start_consuming(consumer, connection, physical)
        except BaseException:
            await consumer.stop()
            raise
        try:
            while True:
                yield await consumer.next()
        finally:
            await consumer.stop()

    async def _start_consuming(
        self, consumer: Consumer, connection: AbstractRobustConnection, physical: str
    ) -> None:
        """Open `consumer`'s channel and consume on it; a connection lost meanwhile is waited out.

        A consumer loop opens receivers again and again (after a redelivery it takes one message
        at a time, then widens again), so one is often being opened right as the connection
        goes. That is an outage to wait out, as a publish waits (the channel is opened again on
        the new connection); ending `receive()` there would end the bus's run() for good. The
        broker refusing the consumer (its queue is gone, no permission) still ends it.
        """
        task = asyncio.current_task()
        while True:
            if self._connection is not connection or connection.is_closed:
                raise TransportClosed(f"{self.url} is closed")
            channel: AbstractRobustChannel | None = None
            try:
                # Made before it is opened, so that a channel that fails to open can be closed:
                # else aio-pika would open it again with every reconnection, for nobody. Made
                # while aio-pika reconnects (no connection under it), it raises RuntimeError.
                channel = connection.channel(publisher_confirms=False)
                await channel.initialize()
                await consumer.start(channel, physical)
                return
            except (AMQPError, ChannelInvalidStateError, ConnectionError, RuntimeError) as error:
                if refused(error, _amqp_connection(connection)):
                    kind = AccessRefused if isinstance(error, ChannelAccessRefused) else TransportError
                    raise kind(f"{self.url}: cannot consume from {physical}: {error}") from None
                lost: BaseException = error
            except asyncio.CancelledError as error:
                if task is not None and task.cancelling():
                    raise  # the caller was cancelled
                lost = error  # aiormq cancelled the channel's opening as the connection went
            if channel is not None:
                await _close_quietly(channel)
            log.debug("%s: the connection went as a consumer of %s started (%r); again once it is back",
                      self.url, physical, lost)  # fmt: skip
            # The loss may not be noticed yet (the connection still counts as connected): a pause,
            # so that this is no hot loop, then wait for aio-pika's next connection, looking again
            # every reconnect_interval whether the transport was closed meanwhile.
            await asyncio.sleep(_RESTART_PAUSE)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reconnect_interval):
                    await connection.ready()

    # -- dead letters (see error_queues) ------------------------------------------------------

    async def dead_letters(self, queue: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        return await self._error_queues.list(queue, limit)

    async def replay(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        return await self._error_queues.replay(queue, message_ids)

    async def purge_dead_letters(self, queue: str) -> int:
        return await self._error_queues.purge(queue)


#: Seconds between a consumer's attempts to start while the connection is lost.
_RESTART_PAUSE = 0.1


def _amqp_connection(connection: AbstractRobustConnection) -> AbstractConnection | None:
    """The AMQP connection under `connection` now (None while it reconnects)."""
    underlay = getattr(connection, "transport", None)
    return underlay.connection if underlay is not None else None


def _seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return (moment - datetime.now(UTC)).total_seconds()


async def _close_quietly(
    closable: aio_pika.Channel | AbstractRobustChannel | AbstractRobustConnection,
) -> None:
    with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError, RuntimeError):
        await closable.close()
