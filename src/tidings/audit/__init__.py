"""The audit feed and heartbeats: what every bus with `audit=` on tells the dashboard.

    Bus("basket", transport, audit=True)       # or $TIDINGS_AUDIT=1 for a bus made without audit=

For every delivery it settles the bus sends a small `AuditRecord` (the envelope's headers, the
outcome, how long the handler took, when, which instance, the body up to `max_body` bytes) to the
audit queue on its own transport. `telemetry` hears of each delivery through the Telemetry port,
composed with whatever telemetry the bus has; `shipper` sends the records in batches from a task
of its own, so the handler path only appends to a list.

Every running bus, audit on or not, also publishes a `Heartbeat` every few seconds (service,
instance, host, pid, version, counters, outbox backlog): `heartbeat`. `tidings dashboard`
consumes the queue and the heartbeats (docs/dashboard.md).
"""

from __future__ import annotations

import os

from tidings.audit.heartbeat import HEARTBEAT_INTERVAL, Beater, instance_id
from tidings.audit.records import (
    AUDIT_QUEUE,
    HEARTBEAT_TYPE,
    RECORDS_TYPE,
    AuditRecord,
    Heartbeat,
    decode_heartbeat,
    decode_records,
)
from tidings.audit.service import Audit
from tidings.audit.settings import AuditSettings
from tidings.errors import ConfigurationError

__all__ = [
    "AUDIT_QUEUE",
    "AUDIT_VARIABLE",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TYPE",
    "RECORDS_TYPE",
    "Audit",
    "AuditRecord",
    "AuditSettings",
    "Beater",
    "Heartbeat",
    "audit_for",
    "decode_heartbeat",
    "decode_records",
    "instance_id",
]

#: Turns audit on for a bus made without `audit=` (like $TIDINGS_TRANSPORT for its transport).
AUDIT_VARIABLE = "TIDINGS_AUDIT"
_ON = ("1", "true", "yes", "on")


def audit_for(setting: bool | AuditSettings | None, service: str, instance: str) -> Audit | None:
    """The audit of `Bus(..., audit=setting)`: None reads $TIDINGS_AUDIT, True the default settings."""
    if setting is None:
        setting = os.environ.get(AUDIT_VARIABLE, "").strip().lower() in _ON
    if setting is False:
        return None
    if setting is True:
        return Audit(service, instance, AuditSettings())
    if isinstance(setting, AuditSettings):
        return Audit(service, instance, setting)
    raise ConfigurationError(f"audit= takes True, False or an AuditSettings, not {setting!r}")
