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
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, Unpack, overload

from tidings.audit import HEARTBEAT_INTERVAL, Audit, AuditSettings, Beater, audit_for, instance_id
from tidings.consumer import consume
from tidings.envelope import DEFAULT_MAX_BODY_SIZE
from tidings.errors import ConfigurationError, DuplicateHandler, InvalidMessageType
from tidings.extras import explain_missing_extra
from tidings.handlers import Handler, Handlers, Middleware, Registration
from tidings.logs import logger
from tidings.messages import Command, Event, Message, Reply, validate_wire_name, wire_name_of
from tidings.pipeline import Pipeline
from tidings.requests import RequestOptions, Requests
from tidings.retry import RetryPolicy
from tidings.sending import PublishOptions, Routes, Sender, SendOptions
from tidings.stats import Stats
from tidings.supervision import Supervisor
from tidings.telemetry import Telemetry, telemetry_for
from tidings.transports import DEFAULT_TRANSPORT, Transport, transport_from_url

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tidings.inbox import Inbox, InboxSettings
    from tidings.outbox import Outbox, OutboxSettings
    from tidings.relay import Relay
    from tidings.sagas import Saga, SagaSettings
    from tidings.sagas.registry import Sagas

__all__ = ["DEFAULT_TRANSPORT", "Bus"]

log = logger("tidings.bus")

H = TypeVar("H", bound=Handler)
R = TypeVar("R", bound=Reply)


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class Bus:
    """One service's connection to the message bus.

    The bus puts the parts together and gives each what it needs: the `Sender` (envelopes, routes,
    the transport or the outbox), the `Pipeline` (the consume path), `Requests` (request/reply),
    and with a database the `Outbox`, its `Relay` and the `Inbox`. It owns the handlers, the
    middleware and the `Stats`, which the parts read and count into, and which last as long as it.
    """

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
        saga_settings: SagaSettings | None = None,
        shutdown_grace: float = 30.0,
        telemetry: bool | Telemetry = True,
        audit: bool | AuditSettings | None = None,
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL,
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
        if not shutdown_grace >= 0:
            raise ConfigurationError("shutdown_grace must be 0 seconds or more")
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ConfigurationError("heartbeat_interval must be more than 0 seconds (None: no heartbeats)")
        self.service = service
        if transport is None:
            transport = os.environ.get("TIDINGS_TRANSPORT") or DEFAULT_TRANSPORT  # empty: unset
        self.transport = transport_from_url(transport) if isinstance(transport, str) else transport
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else concurrency * 4
        self.retry = retry or RetryPolicy()
        self.max_deliveries = max_deliveries
        self.max_body_size = max_body_size
        #: Seconds a stopping `run()` gives its in-flight handlers to finish before it cancels them
        #: and releases their messages (a second `stop()`, e.g. a second signal, ends it at once).
        self.shutdown_grace = shutdown_grace
        #: Traces and metrics (`tidings.telemetry`): OpenTelemetry's global providers by default,
        #: silent without `opentelemetry-api`; `telemetry=False` records and imports nothing.
        self.telemetry = telemetry_for(telemetry)
        #: Names this bus instance in its heartbeats and audit records (`host-pid-xxxxxx`).
        self.instance = instance_id()
        #: Seconds between the heartbeats `run()` publishes (docs/dashboard.md); None: none.
        self.heartbeat_interval = heartbeat_interval
        #: The audit feed (`tidings.audit`, docs/dashboard.md): `audit=True`, an `AuditSettings`,
        #: or with None $TIDINGS_AUDIT=1. It hears deliveries through the telemetry.
        self.audit: Audit | None = audit_for(audit, service, self.instance)
        if self.audit is not None:
            self.telemetry = self.audit.telemetry(self.telemetry)
        self._stats = Stats()
        self._handlers = Handlers(middleware=list(middleware))
        # The events this service says it publishes (`declare_publishes`), by wire name.
        self._publishes: dict[str, type[Event]] = {}
        #: With a database: the transactional outbox (`session=`), its relay, and the inbox
        #: middleware, which wraps `bus.use()` middleware and handlers (docs/outbox-inbox.md).
        self.database = database
        self.outbox: Outbox | None = None
        self.inbox: Inbox | None = None
        self.relay: Relay | None = None
        #: The sagas this service runs (`saga()`, docs/sagas.md), made with the first one.
        self.sagas: Sagas | None = None
        self._saga_settings = saga_settings
        if database is not None:
            settings = (outbox_settings, inbox_settings)
            self.outbox, self.relay, self.inbox = _storage(
                service,
                database,
                self.transport,
                self._stats,
                *settings,
                self.telemetry,
                # The heartbeat reports the outbox backlog: the relay looks at it every few seconds.
                watch_backlog=heartbeat_interval is not None,
            )
            self._handlers.middleware.append(self.inbox)
        self._sender = Sender(
            service, self.transport, Routes(service, self._handlers.by_type), self.outbox, self.telemetry
        )
        self._requests = Requests(self._sender, self.transport, max_body_size=max_body_size)
        self._open = False
        self._stopping: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        # Set while a run() is going on: close() waits for it to settle its messages.
        self._run_over: asyncio.Event | None = None
        # A stop asked for before run() got going must not be lost (run() checks this first).
        self._stop_requested = False
        self._background: set[asyncio.Future[None]] = set()

    # -- registration ------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        """This service's input queue."""
        return self.service

    @property
    def stats(self) -> Stats:
        """What the consume path has done since this bus was made."""
        return self._stats

    @property
    def sender(self) -> Sender:
        """How messages leave this service: for parts that only publish or send (no consuming)."""
        return self._sender

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
        registrations = self._handlers.by_type
        if name in registrations:
            raise DuplicateHandler(
                f"service {self.service!r} already has a handler for {name!r} "
                f"({registrations[name].handler!r})"
            )

        def register(handler: H) -> H:
            if not callable(handler):
                raise ConfigurationError(f"{handler!r} is not callable")
            if name in registrations:
                raise DuplicateHandler(f"service {self.service!r} already handles {name!r}")
            # A running consumer reads the registrations at each message: this applies from the next.
            registrations[name] = Registration(message_type, handler, retry)
            if self._open and issubclass(message_type, Event):
                # Subscribing on a running bus binds at once, in the background.
                task = asyncio.ensure_future(self.transport.bind(self.queue, name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return handler

        return register

    def unsubscribe(self, event_type: type[Event]) -> Awaitable[None]:
        """Stop receiving this event type. Await the result to know the broker has unbound it.

        Copies already in the queue are dead-lettered as `unknown-type` when they arrive.
        """
        name = wire_name_of(event_type)
        self._handlers.by_type.pop(name, None)
        if self._open:
            return asyncio.ensure_future(self.transport.unbind(self.queue, name))
        return _done() if _has_loop() else _NothingToAwait()

    def route(self, command_type: type[Command], *, to: str) -> None:
        """Send commands of this type to service `to` (the service that owns them)."""
        self._sender.routes.add(command_type, to)

    def declare_publishes(self, *event_types: type[Event]) -> None:
        """Say that this service publishes these events, for its AsyncAPI document (`tidings
        asyncapi`). A description only: `publish()` takes any event, declared or not."""
        for event_type in event_types:
            if not (isinstance(event_type, type) and issubclass(event_type, Event)):
                raise InvalidMessageType(f"declare_publishes() takes Event classes, not {event_type!r}")
            self._publishes[wire_name_of(event_type)] = event_type

    @property
    def publishes(self) -> Mapping[str, type[Event]]:
        """The events declared with `declare_publishes`, by wire name (read-only)."""
        return MappingProxyType(self._publishes)

    @property
    def registrations(self) -> Mapping[str, Registration]:
        """What this service subscribes to and handles: its registrations by wire name (read-only)."""
        return MappingProxyType(self._handlers.by_type)

    def saga(self, saga_type: type[Saga[Any]], *, retry: RetryPolicy | None = None) -> None:
        """Run the saga `saga_type` in this service: each message type it takes is registered like
        a handler of its own. Needs a database (the state, the inbox and the outbox commit together)."""
        if self.database is None:
            raise ConfigurationError("a saga needs a bus with a database: Bus(..., database=engine)")
        if self.sagas is None:
            from tidings.sagas.registry import Sagas

            self.sagas = Sagas(self.service, self.database, self._saga_settings)
        handlers = self.sagas.add(saga_type)
        # Every registration checked (a type this service handles already) before any is made.
        registering = [(self._register(message_type, retry), handler) for message_type, handler in handlers]
        for register, handler in registering:
            register(handler)

    def use(self, middleware: Middleware) -> None:
        """Add a middleware around every handler call (outermost first); on a running bus, from
        the next message on."""
        self._handlers.middleware.append(middleware)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and declare this service's queue and bindings. Consumes nothing yet.

        With a database it first checks that the outbox and inbox tables exist: a
        `ConfigurationError` says how to create them, before anything is consumed.
        """
        if self._open:
            return
        if self.database is not None:
            from tidings.storage import require_tables

            await require_tables(self.database)
            if self.sagas is not None:
                await self.sagas.require_table()
        await self.transport.open()
        self._open = True
        self._stop_requested = False
        await self._declare()
        await self._requests.open()  # replies are consumed while open, whether run() is or not

    async def _declare(self) -> None:
        """Declare this service's queue and bind its events (idempotent: `running()` redoes it)."""
        await self.transport.declare_queue(self.queue)
        if self.audit is not None:
            await self.transport.declare_queue(self.audit.queue)
        for name, registration in self._handlers.by_type.items():
            if issubclass(registration.message_type, Event):
                await self.transport.bind(self.queue, name)

    async def close(self) -> None:
        """Stop `run()` cleanly, then disconnect.

        A `run()` going on (in another task, as in a web app's lifespan) stops taking messages and
        lets its in-flight handlers finish and settle theirs (within `shutdown_grace`; then they
        are cancelled and their messages released); only then is the transport closed. Requests
        still waiting for a reply fail with `TransportClosed`.
        """
        self._request_stop()
        if self._run_over is not None:
            await self._run_over.wait()
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

    def running(self, *, restart_delay: float = 0.5, max_restart_delay: float = 30.0) -> Supervisor:
        """`async with bus.running():` start, consume and relay in the background, stop on exit.

        For a web app's lifespan. A consumer that fails on a transient error (`TransportError`,
        `Unavailable`) is logged and started again after a wait growing from `restart_delay` to
        `max_restart_delay` seconds; any other error ends the block (its task is cancelled) and is
        raised out of it. On exit, in-flight handlers finish (within `shutdown_grace`), then the
        bus closes. See `tidings.supervision` and docs/web-apps.md.
        """
        return Supervisor(
            self.service,
            start=self.start,
            run=self.run,
            redeclare=self._declare,
            close=self.close,
            restart_delay=restart_delay,
            max_restart_delay=max_restart_delay,
        )

    async def run(self) -> None:
        """Consume this service's queue until `stop()`, `close()`, cancellation or a signal.

        It returns (or raises the consumer's error) only once every task it started has ended: the
        consumer with its handlers, and with a database the relay and the inbox clean-up.
        """
        await self.start()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        self._run_over = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        consuming = asyncio.create_task(
            consume(
                self.transport,
                self.queue,
                self._get_pipeline().process,
                concurrency=self.concurrency,
                prefetch=self.prefetch,
                grace=self.shutdown_grace,
                hurry=self._hurry,
                stats=self._stats,
            )
        )
        stopping = asyncio.create_task(self._stopping.wait())
        storage = [asyncio.create_task(job) for job in (*self._storage_jobs(), *self._monitoring_jobs())]
        try:
            await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            consuming.cancel()
            # Every task ends before run() does, whatever the consumer ended with.
            (ended,) = await asyncio.gather(consuming, return_exceptions=True)
            for task in storage:  # after the handlers: the relay ships what they wrote meanwhile
                task.cancel()
            await asyncio.gather(*storage, return_exceptions=True)
            self._stopping = self._hurry = None
            self._stop_requested = False
            self._run_over.set()
            self._run_over = None
        if isinstance(ended, Exception):
            raise ended

    def _storage_jobs(self) -> list[Coroutine[Any, Any, None]]:
        if self.relay is None or self.inbox is None:
            return []
        jobs = [self.relay.run(), self.inbox.clean_up_forever()]
        return jobs if self.sagas is None else [*jobs, self.sagas.clean_up_forever()]

    def _monitoring_jobs(self) -> list[Coroutine[Any, Any, None]]:
        """The heartbeat and, with audit on, the audit shipper."""
        jobs = [] if self.audit is None else [self.audit.job(self.transport)]
        if self.heartbeat_interval is not None:
            audit = self.audit
            beater = Beater(
                self.service,
                self.instance,
                self.heartbeat_interval,
                stats=self._stats,
                relay=self.relay,
                dropped=lambda: audit.dropped if audit is not None else 0,
            )
            jobs.append(beater.run(self.transport))
        return jobs

    async def create_tables(self) -> None:
        """Create the outbox and inbox tables if missing (a quick start; migrations: `tidings.storage`)."""
        if self.database is None:
            raise ConfigurationError("create_tables() needs a bus with a database: Bus(..., database=engine)")
        from tidings.storage import create_tables

        await create_tables(self.database)
        if self.sagas is not None:
            await self.sagas.create_table()

    def stop(self) -> None:
        """Ask `run()` to stop taking messages; it returns once in-flight ones are settled.

        Asked again while `run()` is stopping (a second SIGINT/SIGTERM under `tidings run`), it
        ends the shutdown grace at once: handlers still running are cancelled, their messages
        released.
        """
        if self._stopping is not None and self._stopping.is_set() and self._hurry is not None:
            self._hurry.set()
        self._request_stop()

    def _request_stop(self) -> None:
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    def _use_transport(self, transport: Transport) -> Transport:
        """Put `transport` in the place of this bus's, for its parts too; returns the one replaced.

        For `tidings.testing`, whose harness runs a bus on a transport of its own and gives the
        original back afterwards. Only on a bus that is not open: its consumer, relay and reply
        queue would go on with the old one. The reply queue gets a new name (a new `Requests`).
        """
        if self._open:
            raise ConfigurationError(f"bus {self.service!r} is open: change its transport before start()")
        previous, self.transport = self.transport, transport
        self._sender.transport = transport
        if self.relay is not None:
            self.relay.transport = transport
        self._requests = Requests(self._sender, transport, max_body_size=self.max_body_size)
        return previous

    def _get_pipeline(self) -> Pipeline:
        # Made per run from the settings of that moment; the handlers, middleware and stats it
        # gets are the bus's own (read live, counted into), so nothing resets or goes stale.
        return Pipeline(
            handlers=self._handlers,
            sender=self._sender,
            stats=self._stats,
            retry=self.retry,
            max_body_size=self.max_body_size,
            max_deliveries=self.max_deliveries,
            on_dead_letter=self._requests.on_dead_letter,
        )

    # -- sending -----------------------------------------------------------------------------

    async def publish(self, event: Event, **options: Unpack[PublishOptions]) -> None:
        """Publish an event to every subscribing service; returns once the transport has it.

        Options (`PublishOptions`): `at`, `subject`, `headers`, `session` (write to the outbox in
        that transaction), `correlation_id`, `causation_id`.
        """
        await self._sender.publish(event, **options)

    async def send(self, command: Command, **options: Unpack[SendOptions]) -> None:
        """Send a command to the service that owns it; returns once the transport has it.

        Options (`SendOptions`): those of `publish`, and `to` (the service), `delay`.
        """
        await self._sender.send(command, **options)

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


def _storage(
    service: str,
    database: AsyncEngine,
    transport: Transport,
    stats: Stats,
    outbox_settings: OutboxSettings | None,
    inbox_settings: InboxSettings | None,
    telemetry: Telemetry,
    *,
    watch_backlog: bool,
) -> tuple[Outbox, Relay, Inbox]:
    """The outbox, its relay and the inbox of a service with a database (the `sql` extra)."""
    try:
        from tidings.inbox import Inbox
        from tidings.outbox import Outbox
        from tidings.relay import Relay
    except ModuleNotFoundError as error:
        explain_missing_extra("sql", "Bus(..., database=engine)", error)
        raise
    outbox = Outbox(service, database, outbox_settings)
    relay = Relay(outbox, transport, telemetry, watch_backlog=watch_backlog)
    return outbox, relay, Inbox(service, database, stats, inbox_settings, telemetry)


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
