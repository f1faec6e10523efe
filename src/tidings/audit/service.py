"""`Audit`: the audit of one bus: its telemetry wrapper and its shipper.

The bus makes one (`audit_for`), wraps its telemetry with `telemetry(inner)` before handing the
telemetry to its parts, declares `queue` with its own queue, and runs `job(...)` beside its
consumer for as long as `run()` runs. (The heartbeat is not the audit's: every running bus
beats, `tidings.audit.heartbeat`.)
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from tidings.audit.settings import AuditSettings
from tidings.audit.shipper import Shipper
from tidings.audit.telemetry import AuditTelemetry
from tidings.telemetry.port import Telemetry
from tidings.transports.base import Transport

__all__ = ["Audit"]


class Audit:
    """What one bus instance with audit on sends to the audit queue."""

    def __init__(self, service: str, instance: str, settings: AuditSettings) -> None:
        self.service = service
        self.settings = settings
        #: Names this bus instance in its records (and its heartbeats).
        self.instance = instance
        self.shipper = Shipper(service, instance, settings)

    @property
    def queue(self) -> str:
        return self.settings.queue

    @property
    def dropped(self) -> int:
        """Records dropped for want of room while the transport could not take them."""
        return self.shipper.dropped

    def telemetry(self, inner: Telemetry) -> Telemetry:
        """The bus's telemetry: `inner`, with every delivery also noted for the audit feed."""
        return AuditTelemetry(inner, self.shipper.take)

    def job(self, transport: Transport) -> Coroutine[Any, Any, None]:
        """The shipper, to run beside the consumer and be cancelled after it."""
        return self.shipper.run(transport)
