"""`Ingest`: the audit queue into the store: records and heartbeats, as they come.

Each message on the queue is a batch of records or one heartbeat (`tidings.audit.records`); it is
acknowledged once stored, so a dashboard that stops or crashes loses nothing (a batch stored but
not acknowledged comes back, and is stored twice: the pages show each delivery by its row, and a
repeated row is visible as such rather than silently lost). What cannot be read is dead-lettered
to the audit queue's error queue with a reason, like any bad input on the bus.

The messages already received when the store is free again are stored together, in one
transaction (up to `GROUP`), and each is acknowledged once that transaction has committed: a
transaction costs over a millisecond on SQLite whatever it holds, which paid once per batch was a
good part of the whole path's time (bench/audit_store.py). A store that fails releases every
message of the group, to be tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence

from tidings.audit import (
    HEARTBEAT_TYPE,
    RECORDS_TYPE,
    AuditRecord,
    Heartbeat,
    decode_heartbeat,
    decode_records,
)
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
#: Messages stored in one transaction at most (of those received already): 16 batches of 200
#: records are a transaction of about 50 ms on SQLite, short enough for retention's deletes and
#: the pages' reads to get their turn between two.
GROUP = 16


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
        #: Records and heartbeats stored, messages refused, and the store's transactions that
        #: stored them (a group of messages each), since the dashboard started.
        self.records = 0
        self.heartbeats = 0
        self.refused = 0
        self.transactions = 0

    async def run(self) -> None:
        """Consume until cancelled; a store that fails is waited out, the batch kept on the queue."""
        await self.transport.declare_queue(self.queue, temporary=self.temporary)
        for event_type in self.events:
            await self.transport.bind(self.queue, event_type)
        failures = 0
        while True:
            receiver = _Receiver(self.transport.receive(self.queue, prefetch=PREFETCH))
            group: Sequence[Delivery] = ()
            try:
                while group := await receiver.next_group(GROUP):
                    await self.take(group)
                    group = ()
                    failures = 0
            except Exception as error:
                failures += 1
                if failures == 1:
                    log.warning("ingesting %s: %s; trying again", self.queue, error)
                await asyncio.sleep(capped_exponential(0.5, 10.0, failures - 1))
            finally:
                # Received but not stored (cancelled meanwhile, or never taken): back on the queue.
                # A message settled already is left as it is (settling again does nothing).
                for delivery in [*group, *await receiver.close()]:
                    with contextlib.suppress(Exception):
                        await delivery.release()

    async def take(self, deliveries: Sequence[Delivery]) -> None:
        """Store what `deliveries` carry in one transaction, then acknowledge each of them; what
        cannot be read is dead-lettered. If the store fails, all are released and it raises."""
        kept: list[Delivery] = []
        batches: list[list[AuditRecord]] = []
        beats: list[Heartbeat] = []
        for delivery in deliveries:
            kind = delivery.headers.get("type")
            try:
                if kind == RECORDS_TYPE:
                    batches.append(decode_records(delivery.body))
                elif kind == HEARTBEAT_TYPE:
                    beats.append(decode_heartbeat(delivery.body))
                else:
                    raise ValueError(f"not an audit message: type {kind!r}")
            except ValueError as error:
                await self._refuse(delivery, error)
                continue
            kept.append(delivery)
        records = [record for batch in batches for record in batch]
        try:
            await self.store.add(records, beats)
        except Exception:
            for delivery in kept:  # the store is down: they wait on the queue
                with contextlib.suppress(Exception):
                    await delivery.release()
            raise
        if records or beats:
            self.transactions += 1
        for delivery in kept:
            await delivery.ack()
        self.records += len(records)
        self.heartbeats += len(beats)
        for batch in batches:  # an event per batch, as the pages know them
            correlations = sorted({r.correlation_id for r in batch if r.correlation_id})[:50]
            self.live.publish("message", count=len(batch), correlations=correlations)
        if any(r.outcome == DEAD_LETTERED for r in records):
            self.live.publish("failed")
        for beat in beats:
            self.live.publish("heartbeat", service=beat.service, instance=beat.instance)

    async def _refuse(self, delivery: Delivery, error: ValueError) -> None:
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


class _Receiver:
    """One `receive()`, read by a task of its own: what arrived while the store was busy is
    there to be taken together (a pending `anext` cannot be given up without closing it)."""

    def __init__(self, deliveries: AsyncIterator[Delivery]) -> None:
        self._deliveries = deliveries
        self._ready: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._ended = False
        self._error: Exception | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for delivery in self._deliveries:
                self._ready.append(delivery)
                self._arrived.set()
        except Exception as error:
            self._error = error
        finally:
            self._ended = True
            self._arrived.set()

    async def next_group(self, most: int) -> list[Delivery]:
        """The next delivery, waited for, and up to `most - 1` more already received, in order;
        empty once the receiver ended by itself (what it raised is raised)."""
        while not self._ready:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return []
            self._arrived.clear()
            await self._arrived.wait()
        return [self._ready.popleft() for _ in range(min(most, len(self._ready)))]

    async def close(self) -> list[Delivery]:
        """Stop receiving (what was prefetched goes back); the deliveries received, not taken."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        close = getattr(self._deliveries, "aclose", None)
        if close is not None:  # hands back what was prefetched but not taken
            with contextlib.suppress(Exception):
                await close()
        left = list(self._ready)
        self._ready.clear()
        return left
