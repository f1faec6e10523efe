"""Test-only fault injection: die by SIGKILL at a named point of the outbox, relay or inbox.

The crash tests (tests/storage/) start real processes with `TIDINGS_CRASH_AT=<point>` (or
`<point>:<n>`, to die on the n-th time the point is reached) to prove what survives a kill at
exactly that point. Never set it in production: the process dies without cleanup, on purpose.

Points: `outbox-after-commit` (a producer's transaction with outbox rows committed, its relay not
yet woken), `relay-after-confirm` (the transport confirmed a batch, the rows are not marked sent),
`inbox-after-commit` (a handler's transaction committed, the message not acknowledged).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_AT", "crash_point"]

CRASH_AT = "TIDINGS_CRASH_AT"

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process if `$TIDINGS_CRASH_AT` names this point (and its count is reached)."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
