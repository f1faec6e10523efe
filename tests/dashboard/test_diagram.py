"""A conversation's records as a sequence diagram: one arrow per message and receiver, deliveries
folded in, arrows in causal order even when the hosts' clocks disagree."""

from __future__ import annotations

from tests.dashboard.records import record
from tidings.dashboard.diagram import build_diagram
from tidings.dashboard.store import StoredRecord


def stored(rows: list[dict[str, object]]) -> list[StoredRecord]:
    return [StoredRecord(index + 1, record(correlation_id="c", **row)) for index, row in enumerate(rows)]


def test_arrows_follow_causation_before_clocks() -> None:
    records = stored(
        [
            # charge was made while ordering handled reserved, but payment's clock is 5 s behind.
            {
                "message_id": "charge",
                "source": "ordering",
                "service": "payment",
                "causation_id": "reserved",
                "sent_at": 95.0,
                "processed_at": 95.1,
            },
            {
                "message_id": "place",
                "source": "basket",
                "service": "ordering",
                "sent_at": 100.0,
                "processed_at": 100.1,
            },
            {
                "message_id": "reserve",
                "source": "ordering",
                "service": "catalog",
                "causation_id": "place",
                "sent_at": 100.2,
                "processed_at": 100.3,
            },
            {
                "message_id": "reserved",
                "source": "catalog",
                "service": "ordering",
                "causation_id": "reserve",
                "sent_at": 100.4,
                "processed_at": 100.5,
            },
        ]
    )
    diagram = build_diagram("c", records)
    assert [a.message_id for a in diagram.arrows] == ["place", "reserve", "reserved", "charge"]
    assert diagram.lifelines == ["basket", "ordering", "catalog", "payment"]
    assert [(a.sender, a.receiver) for a in diagram.arrows][-1] == ("ordering", "payment")
    first, last = diagram.arrows[0], diagram.arrows[-1]
    assert first.x1 < first.x2
    assert last.y > first.y


def test_deliveries_of_one_message_fold_into_one_arrow_with_its_retries() -> None:
    records = stored(
        [
            {
                "message_id": "charge",
                "service": "payment",
                "outcome": "retried",
                "failures": 1,
                "processed_at": 1.0,
                "duration_ms": 3.0,
            },
            {
                "message_id": "charge",
                "service": "payment",
                "outcome": "handled",
                "round": 2,
                "processed_at": 2.0,
                "duration_ms": 4.0,
            },
            # An event to two subscribers is two arrows.
            {
                "message_id": "paid",
                "source": "payment",
                "service": "ordering",
                "causation_id": "charge",
                "processed_at": 3.0,
            },
            {
                "message_id": "paid",
                "source": "payment",
                "service": "catalog",
                "causation_id": "charge",
                "outcome": "dead-lettered",
                "processed_at": 3.1,
            },
        ]
    )
    diagram = build_diagram("c", records)
    charge, *paid = diagram.arrows
    assert (charge.outcome, charge.retries, charge.failures, charge.duration_ms) == ("handled", 1, 1, 7.0)
    assert charge.record_id == 2  # the last delivery is the one linked to
    assert "retried 1x" in charge.label
    assert sorted((a.receiver, a.outcome) for a in paid) == [
        ("catalog", "dead-lettered"),
        ("ordering", "handled"),
    ]
    assert {a.css for a in paid} == {"ok", "dead"}
