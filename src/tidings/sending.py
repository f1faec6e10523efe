"""The send side of a service: envelopes, routes, and the hand-over to the transport or the outbox.

`Sender` is what every part that emits messages gets (the bus's `publish`/`send`, a handler's
`Context`, replies, request/reply), instead of the bus itself:

- `envelope_for` wraps a message in the envelope it travels in from this service;
- `routes.of` names the queue a command goes to (`Routes`: `Bus.route`, or this service when it
  handles the command itself);
- `dispatch` hands an envelope to the transport (published when it has no queue, else sent), or,
  with a database session, writes it to the transactional outbox in that session's transaction;
  its `telemetry` records the message going out and puts the span's context in the envelope
  (`traceparent`), stored with the outbox row too (`tidings.telemetry`).

The outbox is reached through the narrow `OutboxWriter` port, so this module needs no SQL library.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypedDict, Unpack

from tidings.envelope import Envelope, new_message_id
from tidings.errors import ConfigurationError, InvalidMessageType, NoRoute
from tidings.headers import REPLY_TO, REQUEST_ID
from tidings.logs import logger
from tidings.messages import Command, Event, Message, Reply, validate_wire_name, wire_name_of
from tidings.telemetry import NO_TELEMETRY, Telemetry, traced
from tidings.transports.base import Transport

__all__ = ["OutboxWriter", "PublishOptions", "Routes", "SendOptions", "Sender"]

log = logger("tidings.sending")


class PublishOptions(TypedDict, total=False):
    """The keyword options of `publish` (on `Bus` and on a handler's `Context`)."""

    #: Deliver no earlier than this (an aware datetime): a scheduled message.
    at: datetime | None
    #: What the message is about; the outbox keeps messages of one subject in order.
    subject: str | None
    #: Free-form headers that travel with the message.
    headers: Mapping[str, str] | None
    #: A SQLAlchemy session: write to the outbox in its transaction instead of sending now.
    session: Any
    #: The conversation this message belongs to (default: a new one, its own id; in a handler:
    #: the handled message's).
    correlation_id: str | None
    #: The id of the message that caused this one (in a handler: the handled message's id).
    causation_id: str | None


class SendOptions(PublishOptions, total=False):
    """The keyword options of `send`: those of `publish`, a destination and a delay."""

    #: The service to send to; default: the command's route (`Bus.route`) or this service.
    to: str | None
    #: Deliver after this long (not together with `at=`).
    delay: timedelta | None


class OutboxWriter(Protocol):
    """Where messages given a database session go: the transactional outbox (`tidings.outbox`)."""

    async def write(
        self, session: Any, envelope: Envelope, *, queue: str | None, not_before: datetime | None = None
    ) -> None: ...


class Routes:
    """Which service owns each command type: routed explicitly, or handled by this service."""

    def __init__(self, service: str, handled_here: Container[str]) -> None:
        self._service = service
        #: Wire names this service handles (the bus's live registrations): sent to itself.
        self._handled_here = handled_here
        self._routes: dict[str, str] = {}
        # The classes routed, kept only to describe the routes (`routed()`: tidings.asyncapi).
        self._types: dict[str, type[Command]] = {}

    def add(self, command_type: type[Command], to: str) -> None:
        validate_wire_name(to)
        name = wire_name_of(command_type)
        self._routes[name] = to
        self._types[name] = command_type

    def routed(self) -> dict[type[Command], str]:
        """The explicit routes (`Bus.route`), command class -> service; a copy."""
        return {self._types[name]: to for name, to in self._routes.items()}

    def of(self, command_type: type[Command]) -> str:
        """The queue commands of this type go to; `NoRoute` if there is none."""
        name = wire_name_of(command_type)
        if name in self._routes:
            return self._routes[name]
        if name in self._handled_here:
            return self._service
        raise NoRoute(
            f"no route for command {name!r} from service {self._service!r}: "
            f"call bus.route({command_type.__name__}, to='owner-service')"
        )


class Sender:
    """Builds this service's envelopes and hands them to the transport, or to the outbox."""

    def __init__(
        self,
        service: str,
        transport: Transport,
        routes: Routes,
        outbox: OutboxWriter | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self.service = service
        self.transport = transport
        self.routes = routes
        self.outbox = outbox
        #: What this service reports of its work; the parts that get the sender report through it.
        self.telemetry = telemetry

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

    async def publish(self, event: Event, **options: Unpack[PublishOptions]) -> None:
        """Publish an event to every subscribing service; returns once the transport has it."""
        if not isinstance(event, Event):
            raise InvalidMessageType(f"publish() takes an Event, not {type(event).__name__}")
        envelope = self._envelope(event, options)
        await self.dispatch(
            envelope, queue=None, not_before=options.get("at"), session=options.get("session")
        )

    async def send(self, command: Command, **options: Unpack[SendOptions]) -> None:
        """Send a command to the service that owns it; returns once the transport has it."""
        if not isinstance(command, Command):
            raise InvalidMessageType(f"send() takes a Command, not {type(command).__name__}")
        queue = options.get("to") or self.routes.of(type(command))
        envelope = self._envelope(command, options)
        not_before = _when(options.get("delay"), options.get("at"))
        await self.dispatch(envelope, queue=queue, not_before=not_before, session=options.get("session"))

    def _envelope(self, message: Message, options: PublishOptions) -> Envelope:
        """`envelope_for` with the envelope fields of `publish`/`send` options."""
        return self.envelope_for(
            message,
            subject=options.get("subject"),
            headers=options.get("headers"),
            correlation_id=options.get("correlation_id"),
            causation_id=options.get("causation_id"),
        )

    async def reply(self, request: Envelope, reply: Any, *, session: Any = None) -> None:
        """Send `reply` to the instance that sent `request` (its `tidings-reply-to` queue)."""
        if not isinstance(reply, Reply):
            raise InvalidMessageType(
                f"a handler returned {type(reply).__name__}; only a Reply can be returned"
            )
        reply_queue = request.headers.get(REPLY_TO)
        if reply_queue is None:
            log.warning("%s returned a reply to a message that asked for none", request.type)
            return
        envelope = self.envelope_for(
            reply,
            headers={REQUEST_ID: request.id},
            correlation_id=request.correlation_id or request.id,
            causation_id=request.id,
        )
        try:
            await self.dispatch(envelope, queue=reply_queue, session=session)
        except NoRoute:
            # The requester's reply queue is gone with the instance that asked: nobody to answer.
            log.warning("dropping a reply to %s: its reply queue %s is gone", request.id, reply_queue)

    async def dispatch(
        self,
        envelope: Envelope,
        *,
        queue: str | None,
        not_before: datetime | None = None,
        session: Any = None,
    ) -> None:
        """Hand an envelope on: published when `queue` is None, else sent there; with `session`,
        written to the outbox in that session's transaction instead."""
        if session is not None:
            if self.outbox is None:
                raise ConfigurationError("session= needs a bus with a database (the transactional outbox)")
            # The row stores the envelope with its creation context: the relay's send, and the
            # consumers, continue the trace of the code that wrote it.
            creation = self.telemetry.creating(self.transport, envelope, queue)
            if creation is not None:
                envelope = creation.envelope
            await traced(creation, self.outbox.write(session, envelope, queue=queue, not_before=not_before))
            return
        sending = self.telemetry.sending(self.transport, envelope, queue)
        if sending is not None:
            envelope = sending.envelope
        if queue is None:
            await traced(sending, self.transport.publish(envelope, not_before=not_before))
        else:
            await traced(sending, self.transport.send(envelope, queue, not_before=not_before))


def _when(delay: timedelta | None, at: datetime | None) -> datetime | None:
    if delay is not None and at is not None:
        raise ConfigurationError("give delay= or at=, not both")
    if delay is not None:
        return datetime.now(UTC) + delay
    if at is not None and at.tzinfo is None:
        raise ConfigurationError("at= must be an aware datetime (with a time zone)")
    return at
