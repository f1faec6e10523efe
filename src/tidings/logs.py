"""Log records that say which message they are about, outages logged once, JSON lines.

Every logger of tidings is made by `logger(name)`, which attaches `MessageFields`: a record written
while a delivery is being processed (or a message sent) carries that message's `message_id`,
`type`, `correlation_id` and the `service` as attributes, and `trace_id`/`span_id` of the current
span (or of the message's `traceparent`), the same names `extra=` would give. A field the caller
passed in `extra=` wins. The pipeline sets the fields for the time of a delivery (`about`), and
the relay and the inbox clean-up name their service for their whole task (`in_service`); an
application adds the filter to its own handlers to get them on its records too:

    handler.addFilter(tidings.logs.MessageFields())

`JsonLines` formats a record as one JSON object a line (`tidings run --log-format json`), and
`Outage` logs a dependency's outage as one WARNING when it starts and one INFO, with its duration,
when it ends, however many attempts fail in between.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from tidings.telemetry.ids import trace_ids

__all__ = [
    "FIELDS",
    "JsonLines",
    "LibraryToDebug",
    "MessageFields",
    "Outage",
    "about",
    "in_service",
    "logger",
]

#: The attributes `MessageFields` puts on a record, when they are known.
FIELDS = ("message_id", "type", "correlation_id", "service", "trace_id", "span_id")

# The CloudEvents attributes (envelope headers) each field comes from.
_FROM_HEADERS = (("message_id", "id"), ("type", "type"), ("correlation_id", "correlationid"))

# The message (headers) and service a record is about; None outside of a delivery.
_current: ContextVar[tuple[Mapping[str, str], str] | None] = ContextVar("tidings_log_fields", default=None)


@contextmanager
def about(headers: Mapping[str, str], service: str) -> Iterator[None]:
    """Within the block, records are about the message with these headers, in this service."""
    token = _current.set((headers, service))
    try:
        yield
    finally:
        _current.reset(token)


def in_service(service: str) -> None:
    """From now on in this task, records are about `service` (for a task of a part's own).

    Set at the start of a coroutine that runs as its own task (the relay, the inbox clean-up):
    the task's context is a copy, so the setting ends with the task and touches no other.
    """
    _current.set(({}, service))


class MessageFields(logging.Filter):
    """Adds the message's fields and the trace ids to a record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        current = _current.get()
        headers: Mapping[str, str] | None = None
        if current is not None:
            headers, service = current
            for field, header in _FROM_HEADERS:
                value = headers.get(header)
                if value is not None and field not in fields:
                    fields[field] = value
            fields.setdefault("service", service)
        if "trace_id" not in fields:
            ids = trace_ids(headers)
            if ids is not None:
                fields["trace_id"], fields["span_id"] = ids.trace_id, ids.span_id
        return True


_FIELDS_FILTER = MessageFields()


def logger(name: str) -> logging.Logger:
    """The logger `name` (a tidings module's), with `MessageFields` attached once."""
    found = logging.getLogger(name)
    if _FIELDS_FILTER not in found.filters:
        found.addFilter(_FIELDS_FILTER)
    return found


# What every LogRecord has; anything else on a record came from `extra=` or a filter.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the message's fields, any extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a UUID, a path) is written as its text, not lost.
        return json.dumps(line, default=str, ensure_ascii=False)


class LibraryToDebug(logging.Filter):
    """Makes another library's records DEBUG: tidings says what they mean once, in its own words.

    A broker outage makes aio-pika and aiormq log a traceback or a warning for every reconnection
    attempt; the transport logs the outage itself (`Outage`), so theirs are detail for DEBUG.
    Attached to a library's logger, it lowers each record and keeps it only when that logger is
    enabled for DEBUG (the logger's own level check happened before, at the record's old level).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class Outage:
    """A dependency that may be down: one WARNING when it goes, one INFO with the duration when back.

    `down` may be called for every failed attempt and `up` for every success: only the first
    `down` of an outage and the `up` that ends it write a record (the attempts between go to DEBUG).
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self.what = what
        self._since: float | None = None
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def down(self, error: BaseException | str, *, quiet: bool = False) -> bool:
        """An attempt failed; True when this starts the outage (logged as a WARNING).

        `quiet`: the cause was logged as a WARNING already (the broker's outage, by its
        transport), so this one's start is INFO.
        """
        self._failures += 1
        if self._since is not None:
            self._log.debug("%s is still unavailable: %s", self.what, error)
            return False
        self._since = time.monotonic()
        level = logging.INFO if quiet else logging.WARNING
        self._log.log(level, "%s is unavailable: %s", self.what, error, extra={"outage": "started"})
        return True

    def up(self) -> float | None:
        """An attempt succeeded; the outage's duration in seconds when this ended one, else None."""
        if self._since is None:
            return None
        duration = time.monotonic() - self._since
        failures, self._since, self._failures = self._failures, None, 0
        self._log.info(
            "%s is available again after %.1f s (%d failed attempts)",
            self.what,
            duration,
            failures,
            extra={"outage": "ended", "outage_seconds": round(duration, 3)},
        )
        return duration
