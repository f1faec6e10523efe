"""`Clock`: the time a harness's memory transport keeps, which a test can move on.

It is the wall clock plus whatever the test advanced it by: time passes as usual, and `advance()`
jumps. The transport keeps due times on it: a message delayed by `d` seconds (a retry's delay, or a
`not_before` the sender stamped as "wall clock + d") comes due once `d` seconds have passed on this
clock, by waiting or by advancing. So `at=` times are written from `datetime.now(UTC)`, as the
services themselves do, not from this clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["Clock"]


class Clock:
    """Real time plus an offset that only grows: `advance()` moves it on at once."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> datetime:
        """The current time on this clock (aware, UTC)."""
        return datetime.now(UTC) + self._offset

    @property
    def offset(self) -> timedelta:
        """How far this clock is ahead of the wall clock."""
        return self._offset

    def advance(self, by: float | timedelta) -> None:
        """Move the clock on by `by` (seconds or a timedelta); whoever listens is told at once."""
        step = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if step < timedelta(0):
            raise ValueError("a clock only moves forward")
        self._offset += step
        for listener in list(self._listeners):
            listener()

    def on_advance(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after every `advance()`; returns what removes it again."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
