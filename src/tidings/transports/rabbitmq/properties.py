"""AMQP message properties (`basic.publish`'s content header): encoded fast, decoded leniently.

pamqp encodes any property of any type through a generic, per-value dispatch. A tidings message
has a content type, an id, the persistent mode and a table of string headers (see `codec`, which
makes them); encoding just that directly costs half as much on the publish path, byte for byte
the same. Anything else is left to pamqp.

On the way in, pamqp refuses a whole frame for one value it cannot represent: a timestamp past
the year 9999, a short string or table key that is not UTF-8. RabbitMQ passes such properties on
untouched, so one message of a foreign publisher would close the connection, come back after the
reconnection and close it again, forever. `decode_leniently` makes pamqp read such a value as
None (a timestamp) or with U+FFFD in place of the bad bytes (a string), so that the message
arrives and tidings can handle it or dead-letter it.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable
from typing import Any

from pamqp import decode
from pamqp.commands import Basic

__all__ = ["Properties", "decode_leniently"]

# Basic.Properties flags (AMQP 0-9-1, 4.2.6.1) of what every tidings message carries.
_CONTENT_TYPE_FLAG, _HEADERS_FLAG, _DELIVERY_MODE_FLAG, _MESSAGE_ID_FLAG = 0x8000, 0x2000, 0x1000, 0x80
_OTHER_PROPERTIES = tuple(
    name
    for name in Basic.Properties.__slots__
    if name not in ("content_type", "headers", "delivery_mode", "message_id")
)
_LENGTH = struct.Struct(">I")


class Properties(Basic.Properties):
    """`Basic.Properties` that encode the case of every tidings message themselves."""

    def marshal(self) -> bytes:
        encoded = _marshal_common(self)
        return encoded if encoded is not None else super().marshal()


def _marshal_common(properties: Basic.Properties) -> bytes | None:
    for name in _OTHER_PROPERTIES:
        value = getattr(properties, name)
        if value is not None and value != "":
            return None
    flags = 0
    parts = []
    content_type, headers = properties.content_type, properties.headers
    if content_type:
        encoded = content_type.encode()
        if len(encoded) > 255:
            return None
        flags |= _CONTENT_TYPE_FLAG
        parts.append(bytes((len(encoded),)) + encoded)
    if headers is not None:  # an empty table too: pamqp writes its zero length
        table = []
        for key, value in sorted(headers.items()):
            if not isinstance(value, str):
                return None
            key_bytes, value_bytes = key.encode(), value.encode()
            if len(key_bytes) > 128:
                return None  # pamqp truncates such a key (with a warning): leave that to it
            table.append(bytes((len(key_bytes),)) + key_bytes + b"S" + _LENGTH.pack(len(value_bytes)))
            table.append(value_bytes)
        encoded = b"".join(table)
        flags |= _HEADERS_FLAG
        parts.append(_LENGTH.pack(len(encoded)) + encoded)
    if properties.delivery_mode is not None:
        flags |= _DELIVERY_MODE_FLAG
        parts.append(bytes((properties.delivery_mode,)))
    if properties.message_id:
        encoded = properties.message_id.encode()
        if len(encoded) > 255:
            return None
        flags |= _MESSAGE_ID_FLAG
        parts.append(bytes((len(encoded),)) + encoded)
    return flags.to_bytes(2, "big") + b"".join(parts)


def decode_leniently() -> None:
    """Make pamqp decode the values of foreign content headers without refusing the frame.

    Process-wide (pamqp has one decoder table) and idempotent. Every value pamqp decoded before
    decodes to the same; only what it refused decodes differently, as the module docstring says.
    """
    if getattr(decode, "_tidings_lenient", False):
        return
    decode.METHODS["timestamp"] = decode.TABLE_MAPPING[b"T"] = _lenient_timestamp(decode.timestamp)
    decode.METHODS["shortstr"] = _lenient_short_str(decode.short_str)
    decode.METHODS["table"] = decode.TABLE_MAPPING[b"F"] = _lenient_table(decode.field_table)
    decode._tidings_lenient = True  # type: ignore[attr-defined]


_Decoder = Callable[[bytes], tuple[int, Any]]


def _lenient_timestamp(strict: _Decoder) -> _Decoder:
    def timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
        try:
            return strict(value)
        except (ValueError, OverflowError, OSError):
            if len(value) < 8:
                raise  # truncated: a broken frame, not an odd value
            return 8, None  # outside the years datetime knows

    return timestamp


def _lenient_short_str(strict: _Decoder) -> _Decoder:
    def short_str(value: bytes) -> tuple[int, str]:
        try:
            return strict(value)
        except UnicodeDecodeError:
            length = value[0]
            return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")

    return short_str


def _lenient_table(strict: _Decoder) -> _Decoder:
    def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
        try:
            return strict(value)
        except UnicodeDecodeError:
            pass  # a key that is not UTF-8: decode the table again, such keys with U+FFFD
        (length,) = struct.unpack_from(">I", value)
        end = 4 + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        offset, table = 4, {}
        while offset < end:
            key_length = value[offset]
            offset += 1
            key = value[offset : offset + key_length].decode("utf-8", errors="replace")
            offset += key_length
            consumed, table[key] = decode.embedded_value(value[offset:])
            offset += consumed
        return end, table

    return field_table
