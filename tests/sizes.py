"""Smoke sizes for `scripts/test`, full sizes for `scripts/test --full` (TIDINGS_FULL=1).

Soak, chaos and cluster tests take their message counts, rounds and kills from `size`, so the
default run stays within the 20-minute budget and the full run proves the figures the docs quote.
"""

from __future__ import annotations

import os

#: Whether this run asked for the full sizes (`scripts/test --full`).
FULL = os.environ.get("TIDINGS_FULL") == "1"


def size(smoke: int, full: int) -> int:
    """`full` under `scripts/test --full`, else `smoke`."""
    return full if FULL else smoke
