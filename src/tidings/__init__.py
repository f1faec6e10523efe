"""tidings: an asyncio service bus for Python microservices."""

from tidings.bus import Bus
from tidings.context import Context
from tidings.dead_letters import DeadLetters
from tidings.envelope import Envelope
from tidings.errors import (
    ConfigurationError,
    ConnectionFailed,
    DecodeError,
    DuplicateHandler,
    HandlerIntent,
    InvalidMessageType,
    NoRoute,
    PublishNotConfirmed,
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
from tidings.messages import Command, Event, Message, Reply
from tidings.pipeline import Handler, Middleware, Next, Stats
from tidings.requests import RequestOptions
from tidings.retry import RetryPolicy
from tidings.transports import DeadLetter, Delivery, Transport, transport_from_url

__all__ = [
    # The bus and what handlers see
    "Bus",
    # Messages
    "Command",
    # Errors
    "ConfigurationError",
    "ConnectionFailed",
    "Context",
    # Transports (the port, for writing one; users pass a URL)
    "DeadLetter",
    "DeadLetters",
    "DecodeError",
    "Delivery",
    "DuplicateHandler",
    "Envelope",
    "Event",
    "Handler",
    "HandlerIntent",
    "InvalidMessageType",
    "Message",
    "Middleware",
    "Next",
    "NoRoute",
    "PublishNotConfirmed",
    "Reject",
    "RemoteError",
    "Reply",
    # Request/reply
    "RequestOptions",
    "RequestTimeout",
    "Retry",
    # Recoverability
    "RetryPolicy",
    "Stats",
    "TidingsError",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Unavailable",
    "UnknownTransport",
    "transport_from_url",
]

__version__ = "0.1.0"
