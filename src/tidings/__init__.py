"""tidings: an asyncio service bus for Python microservices.

`import tidings` needs only pydantic; `database=` needs the `sql` extra and `amqp://` the
`rabbitmq` extra, imported when first used (`tidings.extras`).
"""

from tidings.audit import AuditSettings
from tidings.bus import Bus
from tidings.context import Context
from tidings.dead_letters import DeadLetters
from tidings.envelope import Envelope
from tidings.errors import (
    AccessRefused,
    ConfigurationError,
    ConnectionFailed,
    DecodeError,
    DuplicateHandler,
    HandlerIntent,
    InvalidMessageType,
    NoRoute,
    PublishNotConfirmed,
    PublishRefused,
    Reject,
    RemoteError,
    RequestTimeout,
    Retry,
    TidingsError,
    TransportClosed,
    TransportError,
    Unavailable,
    UnknownTransport,
)
from tidings.handlers import Handler, Middleware, Next
from tidings.messages import Command, Event, Message, Reply
from tidings.requests import RequestOptions
from tidings.retry import RetryPolicy
from tidings.sagas import (
    Finder,
    MissingPolicy,
    Saga,
    SagaContext,
    SagaSettings,
    SagaStats,
    Transition,
    correlation,
    handles,
    header,
    starts,
    timeout,
)
from tidings.sending import PublishOptions, Sender, SendOptions
from tidings.stats import Stats
from tidings.storage_settings import InboxSettings, OutboxSettings
from tidings.transports import DeadLetter, Delivery, Transport, transport_from_url

# Grouped by theme, not sorted (ruff's RUF022 is off for this file so the headings stay true).
__all__ = [
    # The bus, and what a handler sees
    "Bus",
    "Context",
    "Handler",
    "Middleware",
    "Next",
    "Stats",
    # Messages and their envelope
    "Event",
    "Command",
    "Reply",
    "Message",
    "Envelope",
    # Sending: the options of publish/send, and the part that sends
    "PublishOptions",
    "SendOptions",
    "Sender",
    # Request/reply
    "RequestOptions",
    # Recoverability: retries, handler intents, the error queue
    "RetryPolicy",
    "HandlerIntent",
    "Retry",
    "Reject",
    "DeadLetters",
    # Sagas (with `Bus(..., database=engine)`; docs/sagas.md)
    "Saga",
    "SagaContext",
    "starts",
    "handles",
    "timeout",
    "header",
    "correlation",
    "Finder",
    "MissingPolicy",
    "SagaSettings",
    "SagaStats",
    "Transition",
    # Outbox and inbox (with `Bus(..., database=engine)`)
    "OutboxSettings",
    "InboxSettings",
    # The audit feed and heartbeats, for `tidings dashboard` (docs/dashboard.md)
    "AuditSettings",
    # Errors
    "TidingsError",
    "ConfigurationError",
    "UnknownTransport",
    "InvalidMessageType",
    "DuplicateHandler",
    "NoRoute",
    "DecodeError",
    "RemoteError",
    "RequestTimeout",
    "Unavailable",
    "TransportError",
    "ConnectionFailed",
    "AccessRefused",
    "TransportClosed",
    "PublishNotConfirmed",
    "PublishRefused",
    # Transports (the port, for writing one; users pass a URL)
    "Transport",
    "Delivery",
    "DeadLetter",
    "transport_from_url",
]

__version__ = "0.1.0"
