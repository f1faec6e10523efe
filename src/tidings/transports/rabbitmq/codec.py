"""The CloudEvents AMQP binding, binary content mode: a flat header map to AMQP and back.

On the way out, a CloudEvents attribute (a key matching `ATTRIBUTE_NAME`) becomes the AMQP header
`cloudEvents_<name>`, except `datacontenttype`, which is the AMQP `content_type` property; `id` is
also the AMQP `message_id`. Every other key is a plain AMQP header. Messages are persistent.

On the way in, `cloudEvents_<name>` and `cloudEvents:<name>` (the binding's older spelling) both
give the attribute back, and the headers the broker adds (`x-death`, `x-delivery-count`, ...) are
left out, so a consumer gets the very map the publisher's `Envelope.to_headers()` made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pamqp.commands import Basic

from tidings.envelope import ATTRIBUTE_NAME
from tidings.transports.rabbitmq.properties import Properties

__all__ = ["DUE_HEADER", "OutgoingMessage", "decode_headers", "encode_message"]

_PREFIXES = ("cloudEvents_", "cloudEvents:")
_PREFIX_LENGTH = len("cloudEvents_")
_CONTENT_TYPE = "datacontenttype"
_PERSISTENT = 2
#: When a delay is longer than the delay cascade's maximum: the due time, in ms since the epoch.
DUE_HEADER = "x-tidings-due"
# Headers RabbitMQ writes itself (dead-lettering, delivery counts, federation), and ours above.
_BROKER_HEADERS = frozenset(
    {"x-death", "x-delivery-count", "x-acquired-count", "x-received-from", DUE_HEADER}
)
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """What goes to `basic.publish`: the body and the AMQP properties (headers among them)."""

    body: bytes
    properties: Basic.Properties


@lru_cache(maxsize=1024)
def _wire_key(key: str) -> str:
    # The same few keys come again and again: match each against the pattern once.
    return f"cloudEvents_{key}" if ATTRIBUTE_NAME.match(key) else key


def encode_message(headers: Mapping[str, str], body: bytes) -> OutgoingMessage:
    """An AMQP message carrying `headers` (the flat map) and `body`, persistent."""
    amqp_headers: dict[str, Any] = {
        _wire_key(key): value for key, value in headers.items() if key != _CONTENT_TYPE
    }
    properties = Properties(
        headers=amqp_headers,
        content_type=headers.get(_CONTENT_TYPE),
        message_id=headers.get("id"),
        delivery_mode=_PERSISTENT,
    )
    return OutgoingMessage(body, properties)


def decode_headers(
    amqp_headers: Mapping[str, Any] | None, *, content_type: str | None, message_id: str | None
) -> dict[str, str]:
    """The flat header map of a received AMQP message."""
    headers: dict[str, str] = {}
    for key, value in (amqp_headers or {}).items():
        if key.startswith(_PREFIXES):
            key = key[_PREFIX_LENGTH:]
        elif key in _BROKER_HEADERS or key.startswith(_BROKER_HEADER_PREFIXES):
            continue
        if isinstance(value, str):
            headers[key] = value
        elif (text := _text(value)) is not None:
            headers[key] = text
        # else: tables and arrays from foreign publishers have no place in a flat map
    if content_type and _CONTENT_TYPE not in headers:
        headers[_CONTENT_TYPE] = content_type
    if message_id and "id" not in headers:
        headers["id"] = message_id
    return headers


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None
