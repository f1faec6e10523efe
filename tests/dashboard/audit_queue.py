"""Reading the audit queue and the heartbeats as the dashboard would, for the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.conftest import unique
from tidings.audit import (
    HEARTBEAT_TYPE,
    RECORDS_TYPE,
    AuditRecord,
    Heartbeat,
    decode_heartbeat,
    decode_records,
)
from tidings.transports import Transport, transport_from_url


@dataclass
class Feed:
    records: list[AuditRecord] = field(default_factory=list)
    beats: list[Heartbeat] = field(default_factory=list)
    #: Messages per type, to see that records travel in batches.
    messages: dict[str, int] = field(default_factory=dict)


async def listen_for_heartbeats(url: str) -> str:
    """A queue bound to the heartbeats, as a dashboard binds one; made before the buses run,
    since a heartbeat published while nothing is bound is kept nowhere."""
    queue = unique("beats")
    async with transport_from_url(url) as transport:
        await transport.declare_queue(queue)
        await transport.bind(queue, HEARTBEAT_TYPE)
    return queue


async def read_feed(
    url: str,
    until: Callable[[Feed], bool],
    *,
    queue: str = "tidings.audit",
    heartbeats: str | None = None,
    timeout: float = 15.0,
) -> Feed:
    """Consume the audit queue (and the `heartbeats` queue) on `url` until `until(feed)` holds;
    `AssertionError` after `timeout`."""
    feed = Feed()
    changed = asyncio.Event()

    async def consume(transport: Transport, name: str) -> None:
        deliveries = transport.receive(name, prefetch=50)
        try:
            async for delivery in deliveries:
                kind = delivery.headers["type"]
                feed.messages[kind] = feed.messages.get(kind, 0) + 1
                if kind == RECORDS_TYPE:
                    feed.records += decode_records(delivery.body)
                elif kind == HEARTBEAT_TYPE:
                    feed.beats.append(decode_heartbeat(delivery.body))
                await delivery.ack()
                changed.set()
        finally:
            await deliveries.aclose()  # type: ignore[attr-defined]

    async with transport_from_url(url) as transport:
        await transport.declare_queue(queue)
        names = [queue] if heartbeats is None else [queue, heartbeats]
        readers = [asyncio.create_task(consume(transport, name)) for name in names]
        try:
            async with asyncio.timeout(timeout):
                while not until(feed):
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            raise AssertionError(f"the audit feed never got there: {feed}") from None
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return feed
