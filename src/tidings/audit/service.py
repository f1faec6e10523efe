"""`Audit`: the audit of one bus: its telemetry wrapper, its shipper and its heartbeat.

The bus makes one (`audit_for`), wraps its telemetry with `telemetry(inner)` before handing the
telemetry to its parts, declares `queue` with its own queue, and runs `jobs(...)` beside its
consumer for as long as `run()` runs.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Coroutine
from typing import Any

from tidings.audit.heartbeat import Beater, RelayCounts
from tidings.audit.settings import AuditSettings
from tidings.audit.shipper import Shipper
from tidings.audit.telemetry import AuditTelemetry
from tidings.stats import Stats
from tidings.telemetry.port import Telemetry
from tidings.transports.base import Transport

__all__ = ["Audit"]


def _instance_id() -> str:
    # Readable (host and pid say where to look) and unique (two buses in one process).
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Audit:
    """What one bus instance with audit on sends to the audit queue."""

    def __init__(self, service: str, settings: AuditSettings) -> None:
        self.service = service
        self.settings = settings
        #: Names this bus instance in its records and heartbeats.
        self.instance = _instance_id()
        self.shipper = Shipper(service, self.instance, settings)
        self._telemetry: AuditTelemetry | None = None

    @property
    def queue(self) -> str:
        return self.settings.queue

    def telemetry(self, inner: Telemetry) -> Telemetry:
        """The bus's telemetry: `inner`, with every delivery also noted for the audit feed."""
        self._telemetry = AuditTelemetry(inner, self.shipper.take)
        return self._telemetry

    def jobs(
        self, transport: Transport, stats: Stats, relay: RelayCounts | None
    ) -> list[Coroutine[Any, Any, None]]:
        """The shipper and the heartbeat, to run beside the consumer and be cancelled after it."""
        beater = Beater(
            self.service,
            self.instance,
            self.settings,
            stats=stats,
            relay=relay,
            gauges=lambda: self._telemetry.gauges if self._telemetry is not None else None,
            dropped=lambda: self.shipper.dropped,
        )
        return [self.shipper.run(transport), beater.run(transport)]
