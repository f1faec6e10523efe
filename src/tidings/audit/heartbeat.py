"""The heartbeat: every `heartbeat_interval` seconds, this instance says it is alive and how it does.

Sent straight to the audit queue (not through the shipper's batches), so it keeps coming while
records wait; a last one with `stopping` set when the run ends, so a dashboard can tell an
instance stopped on purpose from one gone silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from importlib import metadata
from typing import Protocol

from tidings.audit.records import HEARTBEAT_TYPE, Heartbeat, encode_heartbeat
from tidings.audit.settings import AuditSettings
from tidings.envelope import Envelope
from tidings.logs import logger
from tidings.stats import Stats
from tidings.telemetry.port import OutboxGauges
from tidings.transports.base import Transport

__all__ = ["Beater", "RelayCounts"]

log = logger("tidings.audit")

try:
    VERSION: str | None = metadata.version("tidings")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = None


class RelayCounts(Protocol):
    """What the heartbeat reads of a relay's stats (`RelayStats`)."""

    sent: int


class Beater:
    """The heartbeats of one bus instance."""

    def __init__(
        self,
        service: str,
        instance: str,
        settings: AuditSettings,
        *,
        stats: Stats,
        relay: RelayCounts | None,
        gauges: Callable[[], OutboxGauges | None],
        dropped: Callable[[], int],
    ) -> None:
        self.service = service
        self.instance = instance
        self.settings = settings
        self.stats = stats
        self.relay = relay
        self.gauges = gauges
        self.dropped = dropped
        self.started_at = time.time()
        self.host = socket.gethostname()

    def beat(self, *, stopping: bool = False) -> Heartbeat:
        counters = dataclasses.asdict(self.stats)
        if self.relay is not None:
            counters["relayed"] = self.relay.sent
        gauges = self.gauges()
        oldest = gauges.oldest if gauges is not None else None
        return Heartbeat(
            service=self.service,
            instance=self.instance,
            host=self.host,
            pid=os.getpid(),
            version=VERSION,
            started_at=self.started_at,
            sent_at=time.time(),
            interval=self.settings.heartbeat_interval,
            counters=counters,
            outbox_backlog=gauges.rows if gauges is not None else None,
            outbox_oldest=oldest.timestamp() if oldest is not None else None,
            audit_dropped=self.dropped(),
            stopping=stopping,
        )

    async def send(self, transport: Transport, *, stopping: bool = False) -> None:
        body = encode_heartbeat(self.beat(stopping=stopping))
        await transport.send(
            Envelope(type=HEARTBEAT_TYPE, source=self.service, body=body), self.settings.queue
        )

    async def run(self, transport: Transport) -> None:
        """Beat until cancelled, then once more with `stopping` set."""
        failing = False
        try:
            while True:
                try:
                    await self.send(transport)
                    failing = False
                except Exception as error:
                    if not failing:  # once per outage: the shipper warns about the records too
                        log.warning("heartbeat of %s: not sent (%s)", self.service, error)
                    failing = True
                await asyncio.sleep(self.settings.heartbeat_interval)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(2.0):
                    await self.send(transport, stopping=True)
            except Exception as error:
                log.debug("last heartbeat of %s not sent: %s", self.service, error)
            raise
