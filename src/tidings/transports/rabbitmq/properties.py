"""AMQP message properties (`basic.publish`'s content header) as tidings messages need them encoded.

pamqp encodes any property of any type through a generic, per-value dispatch. A tidings message
has a content type, an id, the persistent mode and a table of string headers (see `codec`, which
makes them); encoding just that directly costs half as much on the publish path, byte for byte
the same. Anything else is left to pamqp.
"""

from __future__ import annotations

import struct

from pamqp.commands import Basic

__all__ = ["Properties"]

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
