"""One error hierarchy for everything tidings raises.

    TidingsError
    ├── ConfigurationError          a bus, handler, message class or URL is unusable (raised early)
    │   ├── UnknownTransport        a transport URL with a scheme nobody implements
    │   ├── DuplicateHandler        a second handler for a command or reply type
    │   └── InvalidMessageType      a message class without a usable wire name
    ├── NoRoute                     a command has no route, or the route leads nowhere
    ├── TransportError              the broker or the embedded store failed us
    │   ├── ConnectionFailed        could not connect (the URL is in the message, credentials redacted)
    │   ├── PublishNotConfirmed     no confirm (the connection went, or none came in time): it may
    │   │   │                       or may not be stored; publish it again
    │   │   └── PublishRefused      the broker refused that one message (a nack): not stored
    │   ├── AccessRefused       the broker's user may not do that (a missing permission)
    │   └── TransportClosed         the transport was used before open() or after close()
    ├── Unavailable                 a dependency (database, broker) is down: the message goes back
    │                               unhandled, not counted as a failure of the handler
    ├── DecodeError                 bytes on the wire that are not a message we can read
    │   (carries `reason`, a stable reason code, and the raw `headers` and `body`)
    ├── HandlerIntent               raised by a handler to state what should happen to the message
    │   ├── Retry                   try again later; not an error
    │   └── Reject                  straight to the error queue
    ├── RequestTimeout              no reply within the request's timeout
    └── RemoteError                 the handler of a request failed for good (carries type and message)

Dependency exceptions (sqlite3, aio-pika, SQLAlchemy) are translated into these at the boundary.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "AccessRefused",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DuplicateHandler",
    "HandlerIntent",
    "InvalidMessageType",
    "NoRoute",
    "PublishNotConfirmed",
    "PublishRefused",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "Retry",
    "TidingsError",
    "TransportClosed",
    "TransportError",
    "Unavailable",
    "UnknownTransport",
]


class TidingsError(Exception):
    """The root of every error tidings raises."""


class ConfigurationError(TidingsError):
    """A bus, a handler registration, a message class or a URL is unusable."""


class UnknownTransport(ConfigurationError):
    """A transport URL whose scheme no transport implements."""


class DuplicateHandler(ConfigurationError):
    """A second handler for a message type in one service: each service has at most one handler per
    type (event, command or reply); to do two things with one event, call both from one handler."""


class InvalidMessageType(ConfigurationError):
    """A message class without a usable wire name, or something that is not a message class."""


class NoRoute(TidingsError):
    """A command that has no route, or whose route names a service with no queue."""


class TransportError(TidingsError):
    """The transport (broker, embedded store) failed."""


class ConnectionFailed(TransportError):
    """Could not connect to the transport."""


class PublishNotConfirmed(TransportError):
    """The transport did not confirm a message: it may or may not have been stored.

    The connection went before the confirm, or none came in time: a failure of the transport, not
    a verdict on the message, so the caller publishes it again (the outbox relay stops that
    row's chain and waits, to keep the order).
    """


class PublishRefused(PublishNotConfirmed):
    """The broker refused this one message (a negative confirm): it was not stored.

    A verdict on the message, not a failing transport: the outbox relay keeps the row for a later
    try and lets the rows behind it go on. A `PublishNotConfirmed`, so callers that catch that
    one and publish again still do.
    """


class AccessRefused(TransportError):
    """The broker refused an operation for want of permission (its user may not do that there).

    Not a failing transport: doing it again changes nothing until an operator grants it
    (`tidings topology --permissions` prints what a service needs).
    """


class TransportClosed(TransportError):
    """The transport was used before it was opened or after it was closed."""


class Unavailable(TidingsError):
    """A dependency the bus needs (database, broker) is unavailable right now.

    Raised inside the consume path, it sends the message back for later without counting a failed
    attempt: infrastructure errors must not push good messages to the error queue.
    """


class DecodeError(TidingsError):
    """Bytes that are not a message we can read. `reason` is a stable code for the error queue."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.headers = dict(headers or {})
        self.body = body


class HandlerIntent(TidingsError):
    """Base of the exceptions a handler raises to say what should happen to its message."""


class Retry(HandlerIntent):
    """Retry the message later. Not counted as a failure of the handler."""

    def __init__(self, delay: float = 0.0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Reject(HandlerIntent):
    """Send the message straight to the error queue, with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestTimeout(TidingsError):
    """No reply arrived within the request's timeout."""


class RemoteError(TidingsError):
    """The handler of a request failed for good; carries the remote failure's type and message."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
