"""`RetryPolicy`: how often and when a failing handler is tried again.

First `immediate` retries happen at once, in process. Then each delay in `delays` is one delayed
retry: the message goes back to its queue with a not-before time, so it survives a restart and
never blocks the messages behind it. After the last delayed retry the message goes to the error
queue. Exceptions of a type in `never_retry` go to the error queue at the first failure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tidings.errors import ConfigurationError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Immediate retries, then delayed retries with backoff, then the error queue."""

    immediate: int = 2
    delays: tuple[float, ...] = (1.0, 5.0, 30.0)
    #: Each delay is spread by up to this fraction either way, so retries of many messages that
    #: failed together do not all come back at the same instant.
    jitter: float = 0.1
    never_retry: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.immediate < 0:
            raise ConfigurationError("RetryPolicy.immediate must be >= 0")
        if any(delay < 0 for delay in self.delays):
            raise ConfigurationError("RetryPolicy.delays must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("RetryPolicy.jitter must be between 0 and 1")

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries at all: the first failure goes to the error queue."""
        return cls(immediate=0, delays=())

    @property
    def rounds(self) -> int:
        """How many times the message is delivered to the handler at most (1 + delayed retries)."""
        return 1 + len(self.delays)

    def retries(self, error: BaseException) -> bool:
        """Whether this error may be retried at all."""
        return not isinstance(error, self.never_retry)

    def delay_after(self, round_number: int) -> float | None:
        """The delay before round `round_number + 1`, or None when the rounds are used up."""
        if round_number > len(self.delays):
            return None
        base = self.delays[round_number - 1]
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))
