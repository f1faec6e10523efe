"""`Bus`: what a service uses to publish, send, subscribe, handle and run.

    bus = Bus("basket", transport="sqlite:///shop.db")

    @bus.subscribe(ProductPriceChanged)
    async def reprice(event: ProductPriceChanged, ctx: Context) -> None: ...

    async with bus:             # connect and declare the topology; nothing consumed yet
        await bus.publish(ProductPriceChanged(product_id=1, new_price=Decimal("2.5")))
        await bus.run()         # consume until bus.stop(), cancellation or a signal

One service has one input queue, named after it. Events it subscribes to are bound to that queue;
commands it handles are sent to it. Several instances of one service share the queue and compete
for its messages, so each message is handled by one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, Unpack, overload

from tidings.context import Context
from tidings.envelope import DEFAULT_MAX_BODY_SIZE, Envelope, new_message_id
from tidings.errors import ConfigurationError, DuplicateHandler, InvalidMessageType, NoRoute
from tidings.headers import REPLY_TO, REQUEST_ID
from tidings.messages import Command, Event, Message, Reply, validate_wire_name, wire_name_of
from tidings.pipeline import Handler, Middleware, Pipeline, Registration, Stats
from tidings.requests import RequestOptions, Requests
from tidings.retry import RetryPolicy
from tidings.transports import Transport, transport_from_url

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tidings.inbox import Inbox, InboxSettings
    from tidings.outbox import Outbox, OutboxSettings

__all__ = ["DEFAULT_TRANSPORT", "Bus"]

log = logging.getLogger("tidings.bus")

DEFAULT_TRANSPORT = "sqlite:///tidings.db"

H = TypeVar("H", bound=Handler)
R = TypeVar("R", bound=Reply)


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class Bus:
    """One service's connection to the message bus."""

    def __init__(
        self,
        service: str,
        transport: str | Transport | None = None,
        *,
        concurrency: int = 10,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        max_deliveries: int = 10,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        middleware: tuple[Middleware, ...] = (),
        database: AsyncEngine | None = None,
        outbox_settings: OutboxSettings | None = None,
        inbox_settings: InboxSettings | None = None,
    ) -> None:
        if not isinstance(service, str) or not service.strip():
            raise ConfigurationError("a Bus needs a non-empty service name")
        try:
            validate_wire_name(service)
        except InvalidMessageType:
            raise ConfigurationError(
                f"unusable service name {service!r}: use letters, digits and '_.:-'"
            ) from None
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.service = service
        if transport is None:
            transport = os.environ.get("TIDINGS_TRANSPORT", DEFAULT_TRANSPORT)
        self.transport = transport_from_url(transport) if isinstance(transport, str) else transport
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else concurrency * 4
        self.retry = retry or RetryPolicy()
        self.max_deliveries = max_deliveries
        self.max_body_size = max_body_size
        self._middleware = list(middleware)
        #: With a database: the transactional outbox (`session=`) and the inbox middleware, which
        #: wraps `bus.use()` middleware and handlers (docs/outbox-inbox.md).
        self.database = database
        self.outbox: Outbox | None = None
        self.inbox: Inbox | None = None
        if database is not None:
            from tidings.inbox import Inbox
            from tidings.outbox import Outbox

            self.outbox = Outbox(self, database, outbox_settings)
            self.inbox = Inbox(self, database, inbox_settings)
            self._middleware.append(self.inbox)
        self._registrations: dict[str, Registration] = {}
        self._routes: dict[str, str] = {}
        self._open = False
        self._stopping: asyncio.Event | None = None
        # A stop asked for before run() got going must not be lost (run() checks this first).
        self._stop_requested = False
        self._pipeline: Pipeline | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._requests = Requests(self)

    # -- registration ------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        """This service's input queue."""
        return self.service

    @property
    def stats(self) -> Stats:
        """What the consume path has done so far."""
        return self._get_pipeline().stats

    def subscribe(self, event_type: type[Event], *, retry: RetryPolicy | None = None) -> Callable[[H], H]:
        """Decorator: handle every published event of this type (this service gets its copy)."""
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise InvalidMessageType(f"subscribe() takes an Event class, not {event_type!r}")
        return self._register(event_type, retry)

    def handle(
        self, message_type: type[Command] | type[Reply], *, retry: RetryPolicy | None = None
    ) -> Callable[[H], H]:
        """Decorator: this service owns this command type and handles it."""
        if not (isinstance(message_type, type) and issubclass(message_type, Command | Reply)):
            raise InvalidMessageType(f"handle() takes a Command class, not {message_type!r}")
        return self._register(message_type, retry)

    def _register(self, message_type: type[Message], retry: RetryPolicy | None) -> Callable[[H], H]:
        name = wire_name_of(message_type)
        if name in self._registrations:
            raise DuplicateHandler(
                f"service {self.service!r} already has a handler for {name!r} "
                f"({self._registrations[name].handler!r})"
            )

        def register(handler: H) -> H:
            if not callable(handler):
                raise ConfigurationError(f"{handler!r} is not callable")
            if name in self._registrations:
                raise DuplicateHandler(f"service {self.service!r} already handles {name!r}")
            self._registrations[name] = Registration(message_type, handler, retry)
            self._pipeline = None
            if self._open and issubclass(message_type, Event):
                # Subscribing on a running bus binds at once, in the background.
                task = asyncio.ensure_future(self.transport.bind(self.queue, name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return handler

        return register

    def unsubscribe(self, event_type: type[Event]) -> Awaitable[None]:
        """Stop receiving this event type. Await the result to know the broker has unbound it."""
        name = wire_name_of(event_type)
        self._registrations.pop(name, None)
        self._pipeline = None
        if self._open:
            return asyncio.ensure_future(self.transport.unbind(self.queue, name))
        return _done() if _has_loop() else _NothingToAwait()

    def route(self, command_type: type[Command], *, to: str) -> None:
        """Send commands of this type to service `to` (the service that owns them)."""
        validate_wire_name(to)
        self._routes[wire_name_of(command_type)] = to

    def use(self, middleware: Middleware) -> None:
        """Add a middleware around every handler call (outermost first)."""
        self._middleware.append(middleware)
        self._pipeline = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and declare this service's queue and bindings. Consumes nothing yet."""
        if self._open:
            return
        await self.transport.open()
        self._open = True
        self._stop_requested = False
        await self.transport.declare_queue(self.queue)
        for name, registration in self._registrations.items():
            if issubclass(registration.message_type, Event):
                await self.transport.bind(self.queue, name)
        await self._requests.open()  # replies are consumed while open, whether run() is or not

    async def close(self) -> None:
        """Stop consuming (in-flight handlers finish) and disconnect."""
        self.stop()
        if self._open:
            self._open = False
            await self._requests.close()
            await self.transport.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self) -> None:
        """Consume this service's queue until `stop()`, cancellation or a signal."""
        from tidings.consumer import consume

        await self.start()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        pipeline = self._get_pipeline()
        consuming = asyncio.create_task(
            consume(
                self.transport,
                self.queue,
                pipeline.process,
                concurrency=self.concurrency,
                prefetch=self.prefetch,
            )
        )
        stopping = asyncio.create_task(self._stopping.wait())
        storage = [asyncio.create_task(job) for job in self._storage_jobs()]
        try:
            await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            for task in storage:  # after the handlers: the relay ships what they wrote meanwhile
                task.cancel()
            await asyncio.gather(*storage, return_exceptions=True)
            self._stopping = None
            self._stop_requested = False

    def _storage_jobs(self) -> list[Coroutine[Any, Any, None]]:
        if self.outbox is None or self.inbox is None:
            return []
        return [self.outbox.relay.run(), self.inbox.clean_up_forever()]

    async def create_tables(self) -> None:
        """Create the outbox and inbox tables if missing (a quick start; migrations: `tidings.storage`)."""
        if self.database is None:
            raise ConfigurationError("create_tables() needs a bus with a database: Bus(..., database=engine)")
        from tidings.storage import create_tables

        await create_tables(self.database)

    def stop(self) -> None:
        """Ask `run()` to stop taking messages; it returns once in-flight ones are settled."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    def _get_pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = Pipeline(
                self,
                registrations=self._registrations,
                middleware=tuple(self._middleware),
                retry=self.retry,
                max_body_size=self.max_body_size,
                max_deliveries=self.max_deliveries,
            )
        return self._pipeline

    # -- sending -----------------------------------------------------------------------------

    def envelope_for(
        self,
        message: Message,
        *,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope:
        """The envelope `message` travels in from this service."""
        if not isinstance(message, Message) or type(message) in (Event, Command, Reply):
            raise InvalidMessageType(f"{message!r} is not an Event, Command or Reply")
        message_id = new_message_id()
        return Envelope(
            id=message_id,
            type=wire_name_of(type(message)),
            source=self.service,
            body=message.model_dump_json().encode(),
            subject=subject,
            # The first message of a conversation starts it: its id is the correlation id.
            correlation_id=correlation_id or message_id,
            causation_id=causation_id,
            headers=dict(headers or {}),
        )

    async def publish(
        self,
        event: Event,
        *,
        at: datetime | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
        session: Any = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        """Publish an event to every subscribing service; returns once the transport has it."""
        if not isinstance(event, Event):
            raise InvalidMessageType(f"publish() takes an Event, not {type(event).__name__}")
        envelope = self.envelope_for(
            event,
            subject=subject,
            headers=headers,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        await self.dispatch(envelope, queue=None, not_before=at, session=session)

    async def send(
        self,
        command: Command,
        *,
        to: str | None = None,
        delay: timedelta | None = None,
        at: datetime | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
        session: Any = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        """Send a command to the service that owns it; returns once the transport has it."""
        if not isinstance(command, Command):
            raise InvalidMessageType(f"send() takes a Command, not {type(command).__name__}")
        queue = to or self.route_of(type(command))
        envelope = self.envelope_for(
            command,
            subject=subject,
            headers=headers,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        await self.dispatch(envelope, queue=queue, not_before=_when(delay, at), session=session)

    def route_of(self, command_type: type[Command]) -> str:
        """The queue commands of this type go to; `NoRoute` if there is none."""
        name = wire_name_of(command_type)
        if name in self._routes:
            return self._routes[name]
        if name in self._registrations:
            return self.queue
        raise NoRoute(
            f"no route for command {name!r} from service {self.service!r}: "
            f"call bus.route({command_type.__name__}, to='owner-service')"
        )

    async def dispatch(
        self,
        envelope: Envelope,
        *,
        queue: str | None,
        not_before: datetime | None = None,
        session: Any = None,
    ) -> None:
        """Hand an envelope to the transport: published when `queue` is None, else sent there."""
        if session is not None:
            if self.outbox is None:
                raise ConfigurationError("session= needs a bus with a database (the transactional outbox)")
            await self.outbox.write(session, envelope, queue=queue, not_before=not_before)
            return
        if queue is None:
            await self.transport.publish(envelope, not_before=not_before)
        else:
            await self.transport.send(envelope, queue, not_before=not_before)

    # -- request/reply (tidings.requests) ----------------------------------------------------

    @overload
    async def request(self, command: Command, *, expect: type[R], **options: Unpack[RequestOptions]) -> R: ...
    @overload
    async def request(
        self, command: Command, *, expect: None = None, **options: Unpack[RequestOptions]
    ) -> Reply: ...
    async def request(
        self, command: Command, *, expect: type[Reply] | None = None, **options: Unpack[RequestOptions]
    ) -> Reply:
        """Send `command` to its owner and return the reply (an `expect` instance when given).

        Options: `timeout` (seconds, default 30), `to`, `headers`, `correlation_id`, `causation_id`.
        Raises `RequestTimeout` when no reply came in time, `RemoteError` when the handler failed
        for good. The bus must be open (`async with bus`); it need not be running.
        """
        return await self._requests.request(command, expect=expect, **options)

    @property
    def reply_queue(self) -> str:
        """This instance's temporary queue, where replies to its requests arrive."""
        return self._requests.reply_queue

    @property
    def late_replies(self) -> int:
        """Replies that came after their request's timeout (or twice) and were dropped."""
        return self._requests.late_replies

    # -- replies -----------------------------------------------------------------------------

    async def reply_to(self, ctx: Context, reply: Any) -> None:
        """Send `reply` to the requester of the message `ctx` handles."""
        if not isinstance(reply, Reply):
            raise InvalidMessageType(
                f"a handler returned {type(reply).__name__}; only a Reply can be returned"
            )
        reply_queue = ctx.envelope.headers.get(REPLY_TO)
        if reply_queue is None:
            log.warning("%s returned a reply to a message that asked for none", ctx.envelope.type)
            return
        envelope = self.envelope_for(
            reply,
            headers={REQUEST_ID: ctx.message_id},
            correlation_id=ctx.correlation_id,
            causation_id=ctx.message_id,
        )
        try:
            await self.dispatch(envelope, queue=reply_queue, session=ctx.session)
        except NoRoute:
            # The requester's reply queue is gone with the instance that asked: nobody to answer.
            log.warning("dropping a reply to %s: its reply queue %s is gone", ctx.message_id, reply_queue)

    async def on_dead_letter(self, envelope: Envelope, fault: Mapping[str, str]) -> None:
        """Called after a message handled here was dead-lettered: a request gets a fault reply."""
        await self._requests.on_dead_letter(envelope, fault)


def _when(delay: timedelta | None, at: datetime | None) -> datetime | None:
    if delay is not None and at is not None:
        raise ConfigurationError("give delay= or at=, not both")
    if delay is not None:
        return datetime.now(UTC) + delay
    if at is not None and at.tzinfo is None:
        raise ConfigurationError("at= must be an aware datetime (with a time zone)")
    return at


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _NothingToAwait:
    """What `unsubscribe` returns outside an event loop: awaiting it does nothing."""

    def __await__(self) -> Any:
        return iter(())
