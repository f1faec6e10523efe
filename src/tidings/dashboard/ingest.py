"""`Ingest`: the audit queue into the store: records and heartbeats, as they come.

Each message on the queue is a batch of records or one heartbeat (`tidings.audit.records`); it is
acknowledged once stored, so a dashboard that stops or crashes loses nothing (a batch stored but
not acknowledged comes back, and is stored twice: the pages show each delivery by its row, and a
repeated row is visible as such rather than silently lost). What cannot be read is dead-lettered
to the audit queue's error queue with a reason, like any bad input on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from tidings.audit import HEARTBEAT_TYPE, RECORDS_TYPE, decode_heartbeat, decode_records
from tidings.audit.records import DEAD_LETTERED
from tidings.backoff import capped_exponential
from tidings.dashboard.live import Live
from tidings.dashboard.store import Store
from tidings.faults import fault_headers
from tidings.logs import logger
from tidings.transports.base import Delivery, Transport

__all__ = ["Ingest"]

log = logger("tidings.dashboard")

#: Batches taken from the queue at once (each up to `AuditSettings.batch_size` records).
PREFETCH = 32


class Ingest:
    """Consumes the audit queue into a store, and tells the open pages."""

    def __init__(
        self,
        transport: Transport,
        store: Store,
        live: Live,
        *,
        queue: str,
        temporary: bool = False,
        events: Sequence[str] = (),
    ) -> None:
        self.transport = transport
        self.store = store
        self.live = live
        self.queue = queue
        #: A queue of this dashboard's own (gone with it), bound to `events`: the heartbeats,
        #: which every bus publishes whether or not anything listens (docs/dashboard.md).
        self.temporary = temporary
        self.events = tuple(events)
        #: Records and heartbeats stored, and messages refused, since the dashboard started.
        self.records = 0
        self.heartbeats = 0
        self.refused = 0

    async def run(self) -> None:
        """Consume until cancelled; a store that fails is waited out, the batch kept on the queue."""
        await self.transport.declare_queue(self.queue, temporary=self.temporary)
        for event_type in self.events:
            await self.transport.bind(self.queue, event_type)
        failures = 0
        while True:
            deliveries = self.transport.receive(self.queue, prefetch=PREFETCH)
            try:
                async for delivery in deliveries:
                    await self.take(delivery)
                    failures = 0
            except Exception as error:
                failures += 1
                if failures == 1:
                    log.warning("ingesting %s: %s; trying again", self.queue, error)
                await asyncio.sleep(capped_exponential(0.5, 10.0, failures - 1))
            finally:
                close = getattr(deliveries, "aclose", None)
                if close is not None:  # hands back what was prefetched but not taken
                    with contextlib.suppress(Exception):
                        await close()

    async def take(self, delivery: Delivery) -> None:
        kind = delivery.headers.get("type")
        try:
            if kind == RECORDS_TYPE:
                records = decode_records(delivery.body)
            elif kind == HEARTBEAT_TYPE:
                beat = decode_heartbeat(delivery.body)
            else:
                raise ValueError(f"not an audit message: type {kind!r}")
        except ValueError as error:
            self.refused += 1
            log.warning("ingesting %s: refusing a message: %s", self.queue, error)
            headers = fault_headers(
                delivery.headers,
                reason="invalid-payload",
                service="tidings-dashboard",
                queue=self.queue,
                attempts=0,
                detail=str(error),
            )
            await delivery.dead_letter(headers)
            return
        try:
            if kind == RECORDS_TYPE:
                await self.store.add_records(records)
            else:
                await self.store.add_heartbeat(beat)
        except Exception:
            await delivery.release()  # the store is down: the batch waits on the queue
            raise
        await delivery.ack()
        if kind == RECORDS_TYPE:
            self.records += len(records)
            correlations = sorted({r.correlation_id for r in records if r.correlation_id})[:50]
            self.live.publish("message", count=len(records), correlations=correlations)
            if any(r.outcome == DEAD_LETTERED for r in records):
                self.live.publish("failed")
        else:
            self.heartbeats += 1
            self.live.publish("heartbeat", service=beat.service, instance=beat.instance)
