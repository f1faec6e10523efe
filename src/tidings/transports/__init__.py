"""Transports: the memory, SQLite and RabbitMQ implementations of the port in `base`."""

from __future__ import annotations

from urllib.parse import urlsplit

from tidings.errors import UnknownTransport
from tidings.extras import explain_missing_extra
from tidings.transports.base import DeadLetter, Delivery, Transport, error_queue_of
from tidings.transports.urls import redact_url

__all__ = [
    "DEFAULT_TRANSPORT",
    "DeadLetter",
    "Delivery",
    "Transport",
    "error_queue_of",
    "transport_from_url",
]

#: The transport of a `Bus` (and of the CLI) given none and no `TIDINGS_TRANSPORT`: embedded SQLite.
DEFAULT_TRANSPORT = "sqlite:///tidings.db"

_SCHEMES = ("memory", "sqlite", "amqp", "amqps")


def transport_from_url(url: str) -> Transport:
    """Make (not open) the transport a URL names: `memory://`, `sqlite:///path.db`, `amqp://...`."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        from tidings.transports.memory import MemoryTransport

        return MemoryTransport.from_url(url)
    if scheme == "sqlite":
        from tidings.transports.sqlite import SQLiteTransport

        return SQLiteTransport.from_url(url)
    if scheme in ("amqp", "amqps"):
        try:
            from tidings.transports.rabbitmq import RabbitMQTransport
        except ModuleNotFoundError as error:
            explain_missing_extra("rabbitmq", "an amqp:// transport", error)
            raise

        return RabbitMQTransport.from_url(url)
    # The whole URL, so that a typo anywhere in it shows; only the password is hidden.
    problem = f"unknown scheme {scheme!r}" if scheme else "no scheme"
    raise UnknownTransport(
        f"no transport for URL {redact_url(url)!r} ({problem}); known schemes: {', '.join(_SCHEMES)} "
        f"(e.g. {DEFAULT_TRANSPORT}, amqp://user:password@host:5672/vhost, memory://)"
    )
