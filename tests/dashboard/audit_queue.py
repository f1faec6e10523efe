"""Reading the audit queue as the dashboard would, for the tests: records and heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tidings.audit import (
    HEARTBEAT_TYPE,
    RECORDS_TYPE,
    AuditRecord,
    Heartbeat,
    decode_heartbeat,
    decode_records,
)
from tidings.transports import transport_from_url


@dataclass
class Feed:
    records: list[AuditRecord] = field(default_factory=list)
    beats: list[Heartbeat] = field(default_factory=list)
    #: Audit-queue messages per type, to see that records travel in batches.
    messages: dict[str, int] = field(default_factory=dict)


async def read_feed(
    url: str, until: Callable[[Feed], bool], *, queue: str = "tidings.audit", timeout: float = 15.0
) -> Feed:
    """Consume the audit queue on `url` until `until(feed)` holds; `AssertionError` after `timeout`."""
    feed = Feed()
    async with transport_from_url(url) as transport:
        await transport.declare_queue(queue)
        deliveries = transport.receive(queue, prefetch=50)
        try:
            async with asyncio.timeout(timeout):
                while not until(feed):
                    delivery = await anext(deliveries)
                    kind = delivery.headers["type"]
                    feed.messages[kind] = feed.messages.get(kind, 0) + 1
                    if kind == RECORDS_TYPE:
                        feed.records += decode_records(delivery.body)
                    elif kind == HEARTBEAT_TYPE:
                        feed.beats.append(decode_heartbeat(delivery.body))
                    await delivery.ack()
        except TimeoutError:
            raise AssertionError(f"the audit feed never got there: {feed}") from None
        finally:
            await deliveries.aclose()  # type: ignore[attr-defined]
    return feed
