"""`AuditSettings`: where the audit feed goes, how much of a body it keeps, how it batches."""

from __future__ import annotations

from dataclasses import dataclass

from tidings.errors import ConfigurationError

__all__ = ["AuditSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSettings:
    """How a bus audits what it settles (`Bus(..., audit=AuditSettings(...))`)."""

    #: The queue the records go to, on the bus's own transport.
    queue: str = "tidings.audit"
    #: Bytes of a message's body kept in its record (0: none); the rest is cut off, its size kept.
    max_body: int = 2048
    #: Records per message on the audit queue: one send carries many, so auditing costs the
    #: transport one send per batch rather than one per message.
    batch_size: int = 200
    #: Seconds a record may wait for its batch to fill before it is sent anyway.
    flush_interval: float = 0.25
    #: Records held while the transport cannot take them; past this, new ones are dropped (and
    #: counted in the heartbeat) rather than let a broker outage grow the process without bound.
    capacity: int = 50_000

    def __post_init__(self) -> None:
        if not self.queue:
            raise ConfigurationError("AuditSettings.queue must not be empty")
        if self.max_body < 0 or self.batch_size < 1 or self.capacity < 1:
            raise ConfigurationError("AuditSettings: max_body >= 0, batch_size and capacity >= 1")
        if not self.flush_interval > 0:
            raise ConfigurationError("AuditSettings: flush_interval must be > 0")
