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
import os
import socket
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Protocol

from tidings.audit.records import HEARTBEAT_TYPE, Heartbeat, encode_heartbeat
from tidings.envelope import Envelope
from tidings.logs import Outage, logger
from tidings.stats import Stats
from tidings.telemetry.port import OutboxGauges
from tidings.transports.base import Transport

__all__ = ["HEARTBEAT_INTERVAL", "Beater", "RelayCounts", "RelayView", "instance_id"]

#: Seconds between two heartbeats of a bus, by default.
HEARTBEAT_INTERVAL = 5.0
#: How long the last beat, at the end of a run, may take before it is given up.
LAST_BEAT_TIMEOUT = 2.0

# Its own logger: heartbeats go out whether audit is on or not.
log = logger("tidings.heartbeat")

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


class RelayView(Protocol):
    """What the heartbeat reads of the outbox relay: its counts and its last look at the backlog."""

    @property
    def stats(self) -> RelayCounts: ...

    @property
    def gauges(self) -> OutboxGauges: ...


class Beater:
    """The heartbeats of one bus instance."""

    def __init__(
        self,
        service: str,
        instance: str,
        interval: float,
        *,
        stats: Stats,
        relay: RelayView | None,
        dropped: Callable[[], int],
    ) -> None:
        self.service = service
        self.instance = instance
        self.interval = interval
        self.stats = stats
        self.relay = relay
        self.dropped = dropped
        self.started_at = time.time()
        self.host = socket.gethostname()
        # One WARNING when beats stop going out (INFO when the transport logged its outage
        # already), one INFO when they go again.
        self._outage = Outage(log, f"{service}'s heartbeat")

    def beat(self, *, stopping: bool = False) -> Heartbeat:
        counters = dataclasses.asdict(self.stats)
        backlog = oldest = None
        if self.relay is not None:
            counters["relayed"] = self.relay.stats.sent
            backlog, oldest = self.relay.gauges.rows, self.relay.gauges.oldest
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
            outbox_backlog=backlog,
            outbox_oldest=oldest.timestamp() if oldest is not None else None,
            audit_dropped=self.dropped(),
            stopping=stopping,
        )

    async def send(self, transport: Transport, *, stopping: bool = False) -> None:
        body = encode_heartbeat(self.beat(stopping=stopping))
        await transport.publish(Envelope(type=HEARTBEAT_TYPE, source=self.service, body=body))

    async def run(self, transport: Transport) -> None:
        """Beat until cancelled, then once more with `stopping` set."""
        try:
            while True:
                try:
                    # A publish held up by an outage must not hold up the beats after it.
                    async with asyncio.timeout(max(self.interval, LAST_BEAT_TIMEOUT)):
                        await self.send(transport)
                except Exception as error:
                    self._outage.down(str(error) or type(error).__name__, quiet=transport.in_outage)
                else:
                    self._outage.up()
                await asyncio.sleep(self.interval)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(LAST_BEAT_TIMEOUT):
                    await self.send(transport, stopping=True)
            except Exception as error:
                log.debug("last heartbeat of %s not sent: %s", self.service, error)
            raise
