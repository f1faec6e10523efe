"""A conversation as a sequence diagram: services as lifelines, messages as arrows, in causal order.

One arrow is one message received by one service: its deliveries there (a failed try, the retry
that handled it) are folded into it, with the retries counted and the last delivery's outcome
shown. The arrow goes from the message's sender (its `source`) to the service that got it.

Causal order: a message comes after the one that caused it (its causation id, received by its
sender), and otherwise in the order the messages were made. Clocks of different hosts may
disagree by a little; the causation links do not, so they decide first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from tidings.audit.records import DEAD_LETTERED, DUPLICATE, HANDLED, RETRIED
from tidings.dashboard.store import StoredRecord

__all__ = ["Arrow", "Diagram", "build_diagram"]

#: Drawing sizes, in SVG user units.
LANE = 190
ROW = 46
TOP = 56
MARGIN = 24


@dataclass(slots=True)
class Arrow:
    """One message as one service received it."""

    message_id: str
    type: str
    sender: str
    receiver: str
    #: The last delivery's outcome, and every delivery's row id (the last is the one linked to).
    outcome: str
    records: list[StoredRecord]
    sent_at: float
    #: Deliveries that went back for a later try, and handler calls that raised.
    retries: int = 0
    failures: int = 0
    duration_ms: float = 0.0
    causation_id: str | None = None
    #: Filled in by the layout.
    index: int = 0
    x1: int = 0
    x2: int = 0
    y: int = 0
    children: list[Arrow] = field(default_factory=list)

    @property
    def record_id(self) -> int:
        return self.records[-1].id

    @property
    def label(self) -> str:
        parts = [
            self.type,
            f"{self.duration_ms:.0f} ms" if self.duration_ms >= 1 else f"{self.duration_ms:.1f} ms",
        ]
        if self.retries:
            parts.append(f"retried {self.retries}x")
        if self.outcome not in (HANDLED,):
            parts.append(self.outcome)
        return " · ".join(parts)

    @property
    def css(self) -> str:
        return {HANDLED: "ok", DUPLICATE: "duplicate", RETRIED: "retried", DEAD_LETTERED: "dead"}.get(
            self.outcome, "other"
        )


@dataclass(slots=True)
class Diagram:
    correlation_id: str
    lifelines: list[str]
    arrows: list[Arrow]

    @property
    def width(self) -> int:
        return MARGIN * 2 + LANE * max(1, len(self.lifelines))

    @property
    def height(self) -> int:
        return TOP + ROW * len(self.arrows) + MARGIN

    def lane_x(self, index: int) -> int:
        return MARGIN + LANE * index + LANE // 2


def _fold(records: Sequence[StoredRecord]) -> list[Arrow]:
    arrows: dict[tuple[str, str], Arrow] = {}
    for stored in records:
        record = stored.record
        key = (record.message_id, record.service)
        arrow = arrows.get(key)
        if arrow is None:
            arrow = arrows[key] = Arrow(
                message_id=record.message_id,
                type=record.type,
                sender=record.source or "?",
                receiver=record.service,
                outcome=record.outcome,
                records=[],
                sent_at=record.sent_at if record.sent_at is not None else record.processed_at,
                causation_id=record.causation_id,
            )
        arrow.records.append(stored)
    for arrow in arrows.values():
        arrow.records.sort(key=lambda stored: (stored.record.processed_at, stored.id))
        last = arrow.records[-1].record
        arrow.outcome = last.outcome
        arrow.retries = sum(1 for stored in arrow.records if stored.record.outcome == RETRIED)
        arrow.failures = sum(stored.record.failures for stored in arrow.records)
        arrow.duration_ms = sum(stored.record.duration_ms for stored in arrow.records)
    return list(arrows.values())


def _causal_order(arrows: list[Arrow]) -> list[Arrow]:
    by_receipt = {(arrow.message_id, arrow.receiver): arrow for arrow in arrows}
    roots: list[Arrow] = []
    for arrow in arrows:
        # The cause is the message this one was sent while handling: received by its sender.
        cause = by_receipt.get((arrow.causation_id or "", arrow.sender))
        if cause is None or cause is arrow:
            roots.append(arrow)
        else:
            cause.children.append(arrow)

    def key(arrow: Arrow) -> tuple[float, float, int]:
        return (arrow.sent_at, arrow.records[0].record.processed_at, arrow.records[0].id)

    ready = [(key(arrow), id(arrow), arrow) for arrow in roots]
    heapq.heapify(ready)
    ordered: list[Arrow] = []
    while ready:
        _, _, arrow = heapq.heappop(ready)
        ordered.append(arrow)
        for child in arrow.children:
            heapq.heappush(ready, (key(child), id(child), child))
    return ordered


def build_diagram(correlation_id: str, records: Sequence[StoredRecord]) -> Diagram:
    """The diagram of one conversation's records, laid out."""
    arrows = _causal_order(_fold(records))
    lifelines: dict[str, None] = {}
    for arrow in arrows:
        lifelines.setdefault(arrow.sender, None)
        lifelines.setdefault(arrow.receiver, None)
    diagram = Diagram(correlation_id, list(lifelines), arrows)
    lane = {name: index for index, name in enumerate(diagram.lifelines)}
    for index, arrow in enumerate(arrows):
        arrow.index = index + 1
        arrow.x1 = diagram.lane_x(lane[arrow.sender])
        arrow.x2 = diagram.lane_x(lane[arrow.receiver])
        arrow.y = TOP + ROW * index + ROW // 2
    return diagram
