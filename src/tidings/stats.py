"""`Stats`: the counters of what a bus's consume path did, owned by the bus.

The bus makes one `Stats` and hands it to the parts that count (the pipeline, the inbox, the
consume loop), so the
counts survive whatever is rebuilt or changed on a running bus.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """Counters of what the consume path did, for the demo, tests and health checks."""

    handled: int = 0
    failed_attempts: int = 0
    retries_scheduled: int = 0
    dead_lettered: int = 0
    #: Messages the inbox found handled before: acknowledged without calling the handler.
    duplicates: int = 0
    #: Messages put back for later because a dependency (database, transport) was unavailable.
    unavailable: int = 0
    #: Messages whose handler was cancelled at the end of the shutdown grace: released unsettled.
    released: int = 0
