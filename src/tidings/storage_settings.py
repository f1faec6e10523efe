"""The settings of the outbox relay and of the inbox: plain values, importable without SQL.

They are passed to `Bus(..., outbox_settings=..., inbox_settings=...)`, which hands them to the
parts that use them (`tidings.outbox`, `tidings.relay`, `tidings.inbox`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from tidings.errors import ConfigurationError

__all__ = ["InboxSettings", "OutboxSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    """How the relay ships outbox rows and cleans up after them."""

    #: Rows claimed and shipped per round.
    batch_size: int = 100
    #: Seconds between looks at the table when no local commit woke the relay.
    poll_interval: float = 1.0
    #: Seconds the relay lets a wake-up wait, so the commits of that moment share one round
    #: (one claim and one mark for many rows, instead of two transactions per message).
    linger: float = 0.02
    #: Seconds a relay holds the rows it claimed; a relay that died releases them after this.
    claim_timeout: float = 30.0
    #: Ordering chains shipped at once (rows within a chain go one after the other).
    max_in_flight: int = 32
    #: First and longest wait before a refused row (`NoRoute`, `PublishRefused`) is tried again.
    refused_backoff: float = 1.0
    max_refused_backoff: float = 300.0
    #: How long sent rows are kept (to answer "was it sent?") before they are deleted.
    retention: timedelta = timedelta(hours=1)
    #: Sent rows deleted per statement, and seconds between cleanup runs.
    cleanup_batch_size: int = 1000
    cleanup_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.cleanup_batch_size < 1 or self.max_in_flight < 1:
            raise ConfigurationError("outbox batch sizes and max_in_flight must be at least 1")
        if self.poll_interval <= 0 or self.claim_timeout <= 0 or self.linger < 0:
            raise ConfigurationError(
                "outbox poll_interval and claim_timeout must be positive, linger not negative"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxSettings:
    """How long handled message ids are remembered, and how they are cleaned up."""

    #: The dedup window: a copy of a message arriving later than this is handled again.
    retention: timedelta = timedelta(days=7)
    #: Records deleted per statement, and seconds between cleanup runs.
    cleanup_batch_size: int = 1000
    cleanup_interval: float = 300.0

    def __post_init__(self) -> None:
        if self.retention <= timedelta(0):
            raise ConfigurationError("the inbox retention must be positive")
        if self.cleanup_batch_size < 1 or self.cleanup_interval <= 0:
            raise ConfigurationError("inbox cleanup_batch_size and cleanup_interval must be positive")
