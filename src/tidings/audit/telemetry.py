"""`AuditTelemetry`: the Telemetry port, heard for the audit feed and passed on to another one.

The pipeline and the reply queue already tell the port everything an audit record needs: a
delivery arrives (`processing`), a handler call fails, the message is retried or dead-lettered,
the settling starts (`settle`), the inbox found a duplicate. So auditing is another
implementation of the port, wrapped around the bus's own telemetry (OpenTelemetry or none): each
call goes on to it unchanged, and the handle it returns is wrapped by one that notes the outcome.
When the delivery is over (`end`), the note is handed to the `Shipper` — one list append on the
handler path; building and sending the record happen in the shipper's task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from tidings.audit.records import DEAD_LETTERED, DUPLICATE, HANDLED, RETRIED, UNSETTLED
from tidings.envelope import Envelope
from tidings.telemetry.port import Operation, OutboxGauges, Processing, Sending, Telemetry

__all__ = ["AuditTelemetry", "Settled"]

#: The delivery being processed in this task: the inbox's `duplicate` call names no message, but
#: it happens within the processing of the one it found (the consumer runs each in a task).
_current: ContextVar[Settled | None] = ContextVar("tidings_audit_current", default=None)


class _Ended:
    """The `Operation` returned from `settle` when the wrapped telemetry records none."""

    def end(self, error: BaseException | None = None) -> None:
        pass


_ENDED = _Ended()


class Settled:
    """What happened to one delivery: filled in as the port hears of it, read by the shipper."""

    __slots__ = (
        "_hand_over",
        "arrived",
        "body",
        "duration",
        "error",
        "failures",
        "headers",
        "inner",
        "outcome",
        "queue",
        "reason",
        "service",
    )

    def __init__(
        self,
        service: str,
        queue: str,
        headers: Mapping[str, str],
        body: bytes,
        inner: Processing | None,
        hand_over: Callable[[Settled], None],
    ) -> None:
        self.service = service
        self.queue = queue
        self.headers = headers
        self.body = body
        self.inner = inner
        self._hand_over = hand_over
        self.arrived = time.time()
        self.duration: float | None = None
        self.outcome = UNSETTLED
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.failures = 0

    # -- the Processing protocol -----------------------------------------------------------

    def settle(self, operation: str) -> Operation:
        if self.duration is None:
            self.duration = time.time() - self.arrived
        if operation == "ack":
            if self.outcome != DUPLICATE:
                self.outcome = HANDLED
        elif operation == "retry":
            self.outcome = RETRIED
        elif operation == "dead_letter":
            self.outcome = DEAD_LETTERED
        return self.inner.settle(operation) if self.inner is not None else _ENDED

    def attempt_failed(self, error: BaseException, attempt: int) -> None:
        self.failures += 1
        self.error = error
        if self.inner is not None:
            self.inner.attempt_failed(error, attempt)

    def retrying(self, reason: str, delay: float, error: BaseException | None = None) -> None:
        self.reason = reason
        if error is not None:
            self.error = error
        if self.inner is not None:
            self.inner.retrying(reason, delay, error)

    def dead_lettered(self, reason: str, error: BaseException | None = None) -> None:
        self.reason = reason
        if error is not None:
            self.error = error
        if self.inner is not None:
            self.inner.dead_lettered(reason, error)

    def end(self) -> None:
        if self.duration is None:
            self.duration = time.time() - self.arrived
        if _current.get() is self:
            _current.set(None)
        try:
            self._hand_over(self)
        finally:
            if self.inner is not None:
                self.inner.end()


class AuditTelemetry(Telemetry):
    """The port for one bus with audit on: notes each delivery, passes everything on to `inner`."""

    def __init__(self, inner: Telemetry, hand_over: Callable[[Settled], None]) -> None:
        self.inner = inner
        self._hand_over = hand_over

    def processing(
        self, transport: Any, service: str, headers: Mapping[str, str], body: bytes, queue: str
    ) -> Processing:
        inner = self.inner.processing(transport, service, headers, body, queue)
        settled = Settled(service, queue, headers, body, inner, self._hand_over)
        _current.set(settled)
        return settled

    def duplicate(self, service: str, queue: str) -> None:
        settled = _current.get()
        if settled is not None:
            settled.outcome = DUPLICATE
        self.inner.duplicate(service, queue)

    # -- passed on as they are --------------------------------------------------------------

    def outbox_gauges(self, service: str) -> OutboxGauges | None:
        return self.inner.outbox_gauges(service)

    def sending(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        return self.inner.sending(transport, envelope, queue)

    def creating(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        return self.inner.creating(transport, envelope, queue)

    def relaying(self, transport: Any, envelope: Envelope, queue: str | None) -> Operation | None:
        return self.inner.relaying(transport, envelope, queue)

    def requesting(self, transport: Any, envelope: Envelope, queue: str) -> Operation | None:
        return self.inner.requesting(transport, envelope, queue)

    def late_reply(self, service: str, queue: str) -> None:
        self.inner.late_reply(service, queue)
