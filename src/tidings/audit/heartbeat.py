"""The heartbeat: every few seconds, a running bus says it is alive and how it does.

Every bus beats while `run()` runs, audit on or not (`Bus(..., heartbeat_interval=None)` turns it
off). A beat is *published*, as an event of type `HEARTBEAT_TYPE`: a dashboard binds a queue of
its own to that type, and with none bound the transport keeps nothing, so a system without a
dashboard pays one small publish every few seconds per instance and stores nothing. A last beat
with `stopping` set goes out when the run ends, so a dashboard can tell an instance stopped on
purpose from one gone silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Protocol

from tidings.audit.records import HEARTBEAT_TYPE, Heartbeat, encode_heartbeat
from tidings.envelope import Envelope
from tidings.logs import logger
from tidings.stats import Stats
from tidings.telemetry.port import OutboxGauges
from tidings.transports.base import Transport

__all__ = ["HEARTBEAT_INTERVAL", "Beater", "RelayCounts", "instance_id"]

#: Seconds between two heartbeats of a bus, by default.
HEARTBEAT_INTERVAL = 5.0
#: How long the last beat, at the end of a run, may take before it is given up.
LAST_BEAT_TIMEOUT = 2.0

log = logger("tidings.audit")

try:
    VERSION: str | None = metadata.version("tidings")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = None


def instance_id() -> str:
    """A name for one bus instance: readable (host and pid say where to look) and unique (two buses
    in one process)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RelayCounts(Protocol):
    """What the heartbeat reads of a relay's stats (`RelayStats`)."""

    sent: int


class Beater:
    """The heartbeats of one bus instance."""

    def __init__(
        self,
        service: str,
        instance: str,
        interval: float,
        *,
        stats: Stats,
        relay: RelayCounts | None,
        gauges: Callable[[], OutboxGauges | None],
        dropped: Callable[[], int],
    ) -> None:
        self.service = service
        self.instance = instance
        self.interval = interval
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
            interval=self.interval,
            counters=counters,
            outbox_backlog=gauges.rows if gauges is not None else None,
            outbox_oldest=oldest.timestamp() if oldest is not None else None,
            audit_dropped=self.dropped(),
            stopping=stopping,
        )

    async def send(self, transport: Transport, *, stopping: bool = False) -> None:
        body = encode_heartbeat(self.beat(stopping=stopping))
        await transport.publish(Envelope(type=HEARTBEAT_TYPE, source=self.service, body=body))

    async def run(self, transport: Transport) -> None:
        """Beat until cancelled, then once more with `stopping` set."""
        failing = False
        try:
            while True:
                try:
                    # A publish held up by an outage must not hold up the beats after it.
                    async with asyncio.timeout(max(self.interval, LAST_BEAT_TIMEOUT)):
                        await self.send(transport)
                    failing = False
                except Exception as error:
                    if not failing:
                        # Once per outage; INFO when the transport has logged its outage already.
                        level = logging.INFO if transport.in_outage else logging.WARNING
                        log.log(
                            level,
                            "heartbeat of %s: not sent (%s)",
                            self.service,
                            error or type(error).__name__,
                        )
                    failing = True
                await asyncio.sleep(self.interval)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(LAST_BEAT_TIMEOUT):
                    await self.send(transport, stopping=True)
            except Exception as error:
                log.debug("last heartbeat of %s not sent: %s", self.service, error)
            raise
