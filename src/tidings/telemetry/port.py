"""The telemetry port: what the parts of a bus report about their work, and the silent default.

The parts call a `Telemetry` they are given (the `Sender` carries the bus's; the relay and the
inbox get it in their constructor). Each call that starts an operation returns a handle to end it,
or None when nothing is listening: the caller then does exactly what it did before, so a bus
without telemetry pays one method call and one `is None` per operation. `tidings.telemetry.otel`
implements the port on OpenTelemetry; `NO_TELEMETRY` is the default that reports nothing.

| call | made by | on OpenTelemetry |
|---|---|---|
| `sending` | `Sender.dispatch`, to the transport | PRODUCER `publish E` / `send q`, its context sent along |
| `creating` | `Sender.dispatch`, to the outbox | PRODUCER `create q`, its context stored with the row |
| `relaying` | the relay shipping a row | CLIENT `send q`, child of the stored context, linked to it |
| `requesting` | `Requests.request` | INTERNAL `request q`, around the send and the wait |
| `processing` | the pipeline, the reply queue | CONSUMER `process q`, child of the message's context |
| `duplicate`, `late_reply` | the inbox, the reply queue | counters, and events on the current span |
| `outbox_gauges` | the relay | the backlog gauges, fed by the relay's periodic look |
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from tidings.envelope import Envelope

__all__ = [
    "NO_TELEMETRY",
    "Operation",
    "OutboxGauges",
    "Processing",
    "Sending",
    "Telemetry",
    "traced",
]


class Operation(Protocol):
    """One operation being recorded (a span, a duration, or both). End it exactly once."""

    def end(self, error: BaseException | None = None) -> None:
        """The operation is over; `error` is what it failed with, if it failed."""


class Sending(Operation, Protocol):
    """A message on its way out."""

    #: The envelope to hand on: the one given, with its creation context (`traceparent`) added.
    envelope: Envelope


class Processing(Protocol):
    """One delivery going through the consume path, from its arrival to its settling."""

    def settle(self, operation: str) -> Operation:
        """Settling starts: `ack`, `retry`, `dead_letter` or `release`."""

    def attempt_failed(self, error: BaseException, attempt: int) -> None:
        """A handler call raised (it may be tried again)."""

    def retrying(self, reason: str, delay: float, error: BaseException | None = None) -> None:
        """The message goes back for later: `handler-failed`, `retry-requested` or `unavailable`."""

    def dead_lettered(self, reason: str, error: BaseException | None = None) -> None:
        """The message goes to the error queue with this reason code."""

    def end(self) -> None:
        """The delivery is settled (or given up on): the processing is over."""


@dataclass(eq=False, slots=True, weakref_slot=True)
class OutboxGauges:
    """The relay's last look at its service's unsent rows, which the backlog gauges report."""

    service: str
    #: Unsent rows at the last look (None before the first).
    rows: int | None = None
    #: When the oldest of them was written (None: none unsent).
    oldest: datetime | None = None

    def update(self, rows: int, oldest: datetime | None) -> None:
        self.rows, self.oldest = rows, oldest

    def wanted(self) -> bool:
        """Whether anything reads the gauges now; the relay does not look when nothing does."""
        return False


class Telemetry:
    """The port, and the implementation that reports nothing (every call returns None)."""

    def sending(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        """`envelope` goes to the transport now: published when `queue` is None, else sent there."""
        return None

    def creating(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        """`envelope` is written to the outbox, to be shipped by the relay once committed."""
        return None

    def relaying(self, transport: Any, envelope: Envelope, queue: str | None) -> Operation | None:
        """The relay ships an outbox row's envelope (its headers hold the creation context)."""
        return None

    def requesting(self, transport: Any, envelope: Envelope, queue: str) -> Operation | None:
        """A request goes out and its reply is awaited (`RequestTimeout` when it ends so)."""
        return None

    def processing(
        self, transport: Any, service: str, headers: Mapping[str, str], body: bytes, queue: str
    ) -> Processing | None:
        """A delivery from `queue` arrives at `service`; its headers may hold a creation context."""
        return None

    def duplicate(self, service: str, queue: str) -> None:
        """The inbox acknowledged a message handled before without calling the handler."""

    def late_reply(self, service: str, queue: str) -> None:
        """A reply came that no request waits for any more (too late, or a second answer)."""

    def outbox_gauges(self, service: str) -> OutboxGauges | None:
        """The gauges a relay of `service` feeds, or None when there are none."""
        return None


#: The default of every part: telemetry off.
NO_TELEMETRY = Telemetry()


def traced(operation: Operation | None, call: Awaitable[Any]) -> Awaitable[Any]:
    """`call`, to be awaited within `operation` (ended with the error `call` raises, if any).

    Without an operation it is `call` itself: no coroutine more on the path without telemetry.
    """
    if operation is None:
        return call
    return _within(operation, call)


async def _within(operation: Operation, call: Awaitable[Any]) -> Any:
    try:
        result = await call
    except BaseException as error:
        operation.end(error)
        raise
    operation.end()
    return result
