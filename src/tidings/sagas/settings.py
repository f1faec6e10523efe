"""`SagaSettings`: how long completed sagas are kept, and how often a step is retried on a conflict."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from tidings.errors import ConfigurationError

__all__ = ["SagaSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaSettings:
    """Settings of a service's sagas (`Bus(..., saga_settings=SagaSettings(...))`)."""

    #: A completed saga's row is kept this long, so late or duplicated news for it is recognised
    #: (and ignored) instead of starting it again; then it is deleted. Like the inbox's dedup window.
    retention: timedelta = timedelta(days=7)
    cleanup_interval: float = 300.0
    cleanup_batch_size: int = 1000
    #: A step that lost the race for its saga's row (another instance saved first) runs again at
    #: once on the new state, up to this many times; then its message goes back for later
    #: (`Retry`), still not counted as a failure.
    max_conflict_retries: int = 20
    #: How long that message waits then, in seconds.
    conflict_delay: float = 0.2

    def __post_init__(self) -> None:
        if self.max_conflict_retries < 0:
            raise ConfigurationError("SagaSettings.max_conflict_retries must be >= 0")
        if self.cleanup_batch_size < 1:
            raise ConfigurationError("SagaSettings.cleanup_batch_size must be >= 1")
