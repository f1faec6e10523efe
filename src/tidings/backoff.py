"""Capped exponential backoff: the one formula behind every "wait longer each time, up to a limit".

Used for outage retries of the consume path, the relay's outage pauses and its refused rows, and
the waits before `bus.running()` starts a failed consumer again.
"""

from __future__ import annotations

__all__ = ["capped_exponential"]


def capped_exponential(first: float, longest: float, step: int) -> float:
    """`first` doubled `step` times (step 0: `first` itself), never more than `longest`."""
    # The exponent is bounded so that a long outage never computes a huge power.
    return float(min(longest, first * 2 ** min(max(step, 0), 60)))
