"""The envelope: CloudEvents 1.0 attributes, free-form headers and the body bytes.

On every transport an envelope travels as a flat map of string headers plus the body. In that map
the CloudEvents attributes keep their own names (`id`, `source`, `type`, `specversion`, `time`,
`datacontenttype`, `subject`, the extensions `correlationid` and `causationid`, W3C `traceparent`
and `tracestate`); every other key is a free-form header. A transport may rename keys on the wire
(the AMQP binding prefixes attributes with `cloudEvents_`) as long as it hands the same map back.
"""

from __future__ import annotations

import json
import math
import os
import re
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from tidings.errors import DecodeError

__all__ = [
    "ATTRIBUTE_NAME",
    "DEFAULT_MAX_BODY_SIZE",
    "MAX_MESSAGE_ID_LENGTH",
    "Envelope",
    "decode_body",
    "new_message_id",
]

SPEC_VERSION = "1.0"
JSON = "application/json"
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
#: The longest message id accepted (AMQP's message-id is a shortstr, at most 255 bytes); the inbox
#: and outbox columns hold this many characters. A longer id is refused when the envelope is read.
MAX_MESSAGE_ID_LENGTH = 255

# A CloudEvents attribute (or extension) name: lower-case letters and digits only. Header keys of any
# other shape (`tidings-attempt`, `x-user`) are plain headers, not CloudEvents attributes.
ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]{1,20}$")

_REQUIRED = ("id", "source", "type", "specversion")
_OWN = frozenset({*_REQUIRED, "time", "datacontenttype", "subject", "correlationid", "causationid"})


def new_message_id() -> str:
    """A UUIDv7 (RFC 9562) string: time-ordered, so ids sort roughly by creation time."""
    milliseconds = _time.time_ns() // 1_000_000
    value = (milliseconds & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    rand = int.from_bytes(os.urandom(10), "big")
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    hex_ = f"{value:032x}"
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on the wire: CloudEvents attributes, headers and the body bytes."""

    type: str
    source: str
    body: bytes
    id: str = field(default_factory=new_message_id)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: str = JSON
    subject: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def with_headers(self, **changes: str | None) -> Envelope:
        """A copy with headers added (a value of None removes the header)."""
        headers = dict(self.headers)
        for key, value in changes.items():
            key = key.replace("_", "-")
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return replace(self, headers=headers)

    def to_headers(self) -> dict[str, str]:
        """The flat header map this envelope travels as (attributes and headers together)."""
        out = dict(self.headers)
        out.update(
            id=self.id,
            source=self.source,
            type=self.type,
            specversion=SPEC_VERSION,
            time=_format_time(self.time),
            datacontenttype=self.datacontenttype,
        )
        if self.subject is not None:
            out["subject"] = self.subject
        if self.correlation_id is not None:
            out["correlationid"] = self.correlation_id
        if self.causation_id is not None:
            out["causationid"] = self.causation_id
        return out

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], body: bytes) -> Envelope:
        """Read an envelope back; `DecodeError` with a reason code when attributes are missing."""
        for name in _REQUIRED:
            value = headers.get(name)
            if not isinstance(value, str) or not value:
                raise DecodeError(
                    "missing-attribute",
                    f"CloudEvents attribute {name!r} is missing",
                    headers=headers,
                    body=body,
                )
        if len(headers["id"]) > MAX_MESSAGE_ID_LENGTH:
            raise DecodeError(
                "bad-attribute",
                f"id is {len(headers['id'])} characters long, more than {MAX_MESSAGE_ID_LENGTH}",
                headers=headers,
                body=body,
            )
        if headers["specversion"] != SPEC_VERSION:
            raise DecodeError(
                "bad-attribute",
                f"specversion {headers['specversion']!r} is not {SPEC_VERSION}",
                headers=headers,
                body=body,
            )
        try:
            moment = _parse_time(headers["time"]) if "time" in headers else datetime.now(UTC)
        except ValueError:
            raise DecodeError(
                "bad-attribute",
                f"time {headers['time']!r} is not RFC 3339",
                headers=headers,
                body=body,
            ) from None
        return cls(
            id=headers["id"],
            source=headers["source"],
            type=headers["type"],
            body=body,
            time=moment,
            datacontenttype=headers.get("datacontenttype", JSON),
            subject=headers.get("subject"),
            correlation_id=headers.get("correlationid"),
            causation_id=headers.get("causationid"),
            headers={k: v for k, v in headers.items() if k not in _OWN},
        )


#: Longest integer literal accepted. Converting digits to an int is quadratic; Python's own guard
#: (`sys.set_int_max_str_digits`) is process-wide and an application may lift it.
MAX_INTEGER_DIGITS = 4300


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_float(text: str) -> float:
    # `1e999` is valid JSON that Python reads as inf: as hostile as a literal Infinity.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:40]}")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"integer of {len(text)} digits exceeds {MAX_INTEGER_DIGITS}")
    return int(text)


# Made once: json.loads with hooks builds a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int)


def decode_body(envelope: Envelope, *, max_size: int = DEFAULT_MAX_BODY_SIZE) -> Any:
    """Parse the body as strict JSON; `DecodeError` with a reason code for anything hostile.

    The size is checked before a byte is parsed. NaN and Infinity are refused (JSON has neither),
    as are integers past Python's digit limit and nesting deep enough to exhaust the parser.
    """

    def fail(reason: str, detail: str) -> DecodeError:
        return DecodeError(reason, detail, headers=envelope.to_headers(), body=envelope.body)

    if len(envelope.body) > max_size:
        raise fail("too-large", f"body of {len(envelope.body)} bytes exceeds {max_size}")
    media_type = envelope.datacontenttype.split(";", 1)[0].strip().lower()
    if media_type != JSON and not media_type.endswith("+json"):
        raise fail("unsupported-content-type", f"cannot read {envelope.datacontenttype!r}")
    try:
        text = envelope.body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise fail("not-utf8", str(error)) from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise fail("too-deep", "JSON nested too deeply") from None
    except json.JSONDecodeError as error:
        raise fail("not-json", str(error)) from None
    except ValueError as error:
        reason = "not-finite" if "non-finite" in str(error) else "number-too-large"
        raise fail(reason, str(error)) from None
