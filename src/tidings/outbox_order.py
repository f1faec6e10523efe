"""The order the relay keeps: which claimed outbox rows may go now, and in which chains.

Messages written in one transaction, and messages with the same subject, must reach the broker in
the order they were written (outbox row id). A relay ships a row only after every older row it
must follow was shipped: by this relay earlier in the same chain, or before this round.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = ["OutboxRow", "plan"]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """The part of an outbox row the relay needs."""

    id: int
    transaction_key: int
    subject: str | None = None
    headers: str = "{}"
    body: bytes = b""
    queue: str | None = None
    not_before: datetime | None = None
    attempts: int = 0

    def order_keys(self) -> tuple[tuple[str, object], ...]:
        """The rows this one must follow: those of its transaction, and those of its subject."""
        if self.subject is None:
            return (("transaction", self.transaction_key),)
        return (("transaction", self.transaction_key), ("subject", self.subject))


def plan(
    claimed: Sequence[OutboxRow], elsewhere: Iterable[OutboxRow]
) -> tuple[list[list[OutboxRow]], list[OutboxRow]]:
    """Split claimed rows into chains to ship (each in id order) and rows to hold back.

    `elsewhere` are older unsent rows this relay did not claim (another relay has them). A claimed
    row sharing a transaction or a subject with an older row elsewhere, or with a held-back row,
    is held back; the rows left are linked into chains by shared transactions and subjects.
    """
    first_unshipped: dict[tuple[str, object], int] = {}
    for row in elsewhere:
        for key in row.order_keys():
            first_unshipped[key] = min(first_unshipped.get(key, row.id), row.id)
    ready: list[OutboxRow] = []
    held: list[OutboxRow] = []
    for row in sorted(claimed, key=lambda r: r.id):
        if any(first_unshipped.get(key, row.id) < row.id for key in row.order_keys()):
            held.append(row)
            for key in row.order_keys():
                first_unshipped.setdefault(key, row.id)
        else:
            ready.append(row)

    # Union-find over the ready rows: two rows sharing a key are in one chain.
    parent = list(range(len(ready)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, object], int] = {}
    for i, row in enumerate(ready):
        for key in row.order_keys():
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    chains: dict[int, list[OutboxRow]] = {}
    for i, row in enumerate(ready):
        chains.setdefault(find(i), []).append(row)
    return list(chains.values()), held
