"""How the commands name what they work on: a transport, a bus's registrations, its transport URL."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tidings.bus import Bus
from tidings.messages import Event
from tidings.transports import DEFAULT_TRANSPORT, Transport
from tidings.transports.sqlite import SQLiteTransport
from tidings.transports.urls import redact_url

__all__ = ["TRANSPORT_VARIABLE", "Registered", "environment_transport", "registered", "transport_label"]

#: The environment variable a `Bus` made without a transport, and `tidings dead-letters`, read.
TRANSPORT_VARIABLE = "TIDINGS_TRANSPORT"


def environment_transport() -> str:
    """The transport URL from `$TIDINGS_TRANSPORT`, else the default; empty counts as unset, as in `Bus`."""
    return os.environ.get(TRANSPORT_VARIABLE) or DEFAULT_TRANSPORT


def transport_label(transport: Transport) -> str:
    """The transport's URL, credentials redacted; with a relative SQLite path, the absolute one too.

    `sqlite:///tidings.db` is relative to the working directory: a worker started elsewhere uses
    another file, and only the absolute path shows it.
    """
    url = redact_url(transport.url) if transport.url else type(transport).__name__
    if isinstance(transport, SQLiteTransport) and not os.path.isabs(transport.settings.path):
        return f"{url} ({os.path.abspath(transport.settings.path)})"
    return url


@dataclass(frozen=True, slots=True)
class Registered:
    """The wire names a bus has handlers for, by kind."""

    events: tuple[str, ...]
    #: Commands, and replies handled as messages of their own.
    commands: tuple[str, ...]


def registered(bus: Bus) -> Registered:
    """What `bus` subscribes to and handles, each sorted."""
    registrations = bus.registrations
    events = sorted(name for name, r in registrations.items() if issubclass(r.message_type, Event))
    commands = sorted(name for name, r in registrations.items() if not issubclass(r.message_type, Event))
    return Registered(tuple(events), tuple(commands))
