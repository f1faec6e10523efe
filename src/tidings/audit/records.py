"""What goes on the audit queue: batches of `AuditRecord`s, and `Heartbeat`s, as JSON.

A message on the audit queue is an envelope of type `RECORDS_TYPE` whose body is a JSON array of
records, or of type `HEARTBEAT_TYPE` whose body is one heartbeat. Both are read defensively
(`decode_records`, `decode_heartbeat`): the queue is open to anything on the transport, so a
malformed entry raises `ValueError` for the consumer to skip, never anything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json, to_json

__all__ = [
    "AUDIT_QUEUE",
    "DEAD_LETTERED",
    "DUPLICATE",
    "FROM_HEADERS",
    "HANDLED",
    "HEARTBEAT_TYPE",
    "OUTCOMES",
    "RECORDS_TYPE",
    "RECORD_FIELDS",
    "RETRIED",
    "SHIPPED_FIELDS",
    "UNSETTLED",
    "AuditRecord",
    "Heartbeat",
    "decode_heartbeat",
    "decode_records",
    "encode_heartbeat",
    "encode_records",
]

#: The default audit queue (`AuditSettings.queue`).
AUDIT_QUEUE = "tidings.audit"
#: Envelope types on the audit queue.
RECORDS_TYPE = "tidings.audit-records"
HEARTBEAT_TYPE = "tidings.heartbeat"

#: Outcomes of one delivery.
HANDLED = "handled"
DUPLICATE = "duplicate"  # the inbox had handled it before: acknowledged without a handler call
RETRIED = "retried"  # back on its queue for a later try (a failure, `Retry`, or an outage)
DEAD_LETTERED = "dead-lettered"
UNSETTLED = "unsettled"  # given up on before it was settled (the transport brings it back)
OUTCOMES = (HANDLED, DUPLICATE, RETRIED, DEAD_LETTERED, UNSETTLED)


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One delivery as a bus settled it."""

    message_id: str
    type: str
    #: The service that sent the message (its envelope's `source`).
    source: str
    #: The service that received and settled it, from which queue, in which instance.
    service: str
    queue: str
    instance: str
    outcome: str
    #: The reason code of a retry or a dead letter (`handler-failed`, `unknown-type`, ...).
    reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    subject: str | None = None
    #: When the message was made (its envelope's `time` header; the bus leaves it to the reader,
    #: `with_sent_time`) and when it arrived, in seconds since the epoch.
    sent_at: float | None = None
    processed_at: float = 0.0
    #: From the delivery's arrival to the start of its settling: the handler, the inbox, the checks.
    duration_ms: float = 0.0
    #: The round of delayed retries this delivery was (1: the first delivery).
    round: int = 1
    #: Handler calls that raised during this delivery (immediate retries included).
    failures: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    #: The body as text, cut at `AuditSettings.max_body` bytes; `body_size` is the whole size.
    body: str = ""
    body_size: int = 0

    def with_sent_time(self) -> AuditRecord:
        """This record with `sent_at` read from its `time` header when it has none."""
        if self.sent_at is None:
            self.sent_at = _timestamp(self.headers.get("time"))
        return self

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy of every field was most of auditing's cost.
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["headers"] = dict(self.headers)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRecord:
        try:
            record = cls(**{name: data[name] for name in _RECORD_FIELDS if name in data})
        except TypeError as error:
            raise ValueError(f"not an audit record: {error}") from None
        _check(record, _RECORD_TYPES)
        return record


@dataclass(slots=True, kw_only=True)
class Heartbeat:
    """A running bus instance, every `Bus.heartbeat_interval` seconds (published, audit on or not)."""

    service: str
    instance: str
    host: str
    pid: int
    #: The tidings version the instance runs.
    version: str | None
    started_at: float
    sent_at: float
    #: Seconds until the next beat: the dashboard calls an instance silent after a few missed.
    interval: float
    #: `bus.stats`, and `relayed` (rows the outbox relay sent) with a database.
    counters: dict[str, int] = field(default_factory=dict)
    #: Unsent outbox rows at the relay's last look, and when the oldest was written (None: unknown).
    outbox_backlog: int | None = None
    outbox_oldest: float | None = None
    #: Records this instance dropped because the transport could not take them in time.
    audit_dropped: int = 0
    #: The last beat of an instance that stops cleanly.
    stopping: bool = False

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _HEARTBEAT_FIELDS}
        data["counters"] = dict(self.counters)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Heartbeat:
        try:
            beat = cls(**{name: data[name] for name in _HEARTBEAT_FIELDS if name in data})
        except TypeError as error:
            raise ValueError(f"not a heartbeat: {error}") from None
        _check(beat, _HEARTBEAT_TYPES)
        return beat


#: The fields of a record, in the order of a batch's rows.
RECORD_FIELDS = [f.name for f in dataclasses.fields(AuditRecord)]
#: Fields a row may leave out, and the envelope header each is read from: the record carries the
#: headers anyway, so a bus does not ship them twice (`sent_at` is read from `time`).
FROM_HEADERS = {
    "message_id": "id",
    "type": "type",
    "source": "source",
    "correlation_id": "correlationid",
    "causation_id": "causationid",
    "subject": "subject",
}
_REQUIRED_HEADERS = frozenset({"message_id", "type", "source"})
#: The fields a bus ships in its batches' rows, in this order.
SHIPPED_FIELDS = [name for name in RECORD_FIELDS if name not in FROM_HEADERS and name != "sent_at"]
_RECORD_FIELDS = tuple(RECORD_FIELDS)
_HEARTBEAT_FIELDS = tuple(f.name for f in dataclasses.fields(Heartbeat))
_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))
_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "message_id": _TEXT,
    "type": _TEXT,
    "source": _TEXT,
    "service": _TEXT,
    "queue": _TEXT,
    "instance": _TEXT,
    "outcome": _TEXT,
    "reason": _OPTIONAL_TEXT,
    "error_type": _OPTIONAL_TEXT,
    "error_message": _OPTIONAL_TEXT,
    "correlation_id": _OPTIONAL_TEXT,
    "causation_id": _OPTIONAL_TEXT,
    "subject": _OPTIONAL_TEXT,
    "sent_at": _OPTIONAL_NUMBER,
    "processed_at": _NUMBER,
    "duration_ms": _NUMBER,
    "round": (int,),
    "failures": (int,),
    "headers": (dict,),
    "body": _TEXT,
    "body_size": (int,),
}
_HEARTBEAT_TYPES: dict[str, tuple[type, ...]] = {
    "service": _TEXT,
    "instance": _TEXT,
    "host": _TEXT,
    "pid": (int,),
    "version": _OPTIONAL_TEXT,
    "started_at": _NUMBER,
    "sent_at": _NUMBER,
    "interval": _NUMBER,
    "counters": (dict,),
    "outbox_backlog": (int, type(None)),
    "outbox_oldest": _OPTIONAL_NUMBER,
    "audit_dropped": (int,),
    "stopping": (bool,),
}


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _check(value: AuditRecord | Heartbeat, types: Mapping[str, tuple[type, ...]]) -> None:
    # JSON from the queue is whatever someone put there: a wrong type is refused here, not in
    # the store's insert or the page's template.
    for name, allowed in types.items():
        if not isinstance(getattr(value, name), allowed):
            raise ValueError(f"{type(value).__name__}.{name}: {getattr(value, name)!r} is not {allowed}")


def _dumps(value: Any) -> bytes:
    # pydantic-core's encoder (pydantic is a dependency already) is about three times as fast as
    # the standard library's, and a batch is encoded on the bus's event loop.
    return to_json(value)


def encode_records(rows: list[list[Any]], fields: Sequence[str] = RECORD_FIELDS) -> bytes:
    """The body of one batch: each record as a row of values in `fields` order.

    Rows rather than objects: the names once per batch instead of once per record, which makes
    the batch about half the size and its encoding about twice as fast (`bench/audit_throughput.py`).
    A bus ships `SHIPPED_FIELDS`; the fields it leaves out are read from the headers.
    """
    return _dumps({"fields": fields, "rows": rows})


def _record_from_row(fields: Sequence[str], row: Sequence[Any]) -> AuditRecord:
    """The record a row of a batch holds (`ValueError` if it is not one), what the row left out
    read from its headers, `sent_at` from the `time` header."""
    data = dict(zip(fields, row, strict=True))
    headers = data.get("headers")
    if isinstance(headers, dict):
        for name, header in FROM_HEADERS.items():
            if name not in data:
                data[name] = headers.get(header, "" if name in _REQUIRED_HEADERS else None)
    return AuditRecord.from_json(data).with_sent_time()


def decode_records(body: bytes) -> list[AuditRecord]:
    """The records of one batch; `ValueError` when it is not one."""
    data = from_json(body)
    if not isinstance(data, dict):
        raise ValueError("an audit batch is a JSON object with fields and rows")
    fields, rows = data.get("fields"), data.get("rows")
    if not isinstance(fields, list) or not all(isinstance(name, str) for name in fields):
        raise ValueError("an audit batch names its fields")
    width = len(fields)
    if not isinstance(rows, list) or not all(isinstance(row, list) and len(row) == width for row in rows):
        raise ValueError("an audit batch's rows have a value per field")
    return [_record_from_row(fields, row) for row in rows]


def encode_heartbeat(beat: Heartbeat) -> bytes:
    return _dumps(beat.to_json())


def decode_heartbeat(body: bytes) -> Heartbeat:
    data = from_json(body)
    if not isinstance(data, dict):
        raise ValueError("a heartbeat is a JSON object")
    return Heartbeat.from_json(data)
