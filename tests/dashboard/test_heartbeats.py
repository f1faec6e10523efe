"""Heartbeats: every running bus publishes them, audit on or not; a queue bound to them gets them,
and with nothing bound none is kept anywhere; `heartbeat_interval=None` turns them off."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import system_url, unique
from tests.dashboard.audit_queue import Feed, listen_for_heartbeats, read_feed
from tests.helpers import running
from tidings import Bus
from tidings.audit import HEARTBEAT_TYPE, decode_heartbeat
from tidings.errors import ConfigurationError
from tidings.transports import transport_from_url


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_a_bus_without_audit_publishes_heartbeats(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDINGS_AUDIT", raising=False)
    url = system_url(kind, tmp_path)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}")
    bus = Bus(unique("shop"), url, database=engine, heartbeat_interval=0.1, telemetry=False)
    assert bus.audit is None
    await bus.create_tables()
    beats = await listen_for_heartbeats(url)
    async with running(bus):
        await asyncio.sleep(0.4)
    await engine.dispose()

    def stopped(feed: Feed) -> bool:
        return any(beat.stopping for beat in feed.beats)

    feed = await read_feed(url, stopped, heartbeats=beats)
    assert feed.records == []  # no audit: nothing on the audit queue
    mine = [beat for beat in feed.beats if beat.instance == bus.instance]
    assert len(mine) == len(feed.beats) >= 3
    assert [beat.stopping for beat in mine] == [False] * (len(mine) - 1) + [True]
    last = mine[-1]
    assert (last.service, last.interval, last.audit_dropped) == (bus.service, 0.1, 0)
    assert last.counters["handled"] == 0
    assert "relayed" in last.counters
    # The relay looks at its backlog for the heartbeat even with no telemetry reading the gauges.
    assert last.outbox_backlog == 0


async def test_with_nothing_bound_a_heartbeat_is_kept_nowhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    bus = Bus(unique("quiet"), url, heartbeat_interval=0.05, telemetry=False)
    async with running(bus):
        await asyncio.sleep(0.3)  # some beats, none bound
        async with transport_from_url(url) as transport:
            listener = unique("beats")
            await transport.declare_queue(listener)
            await transport.bind(listener, HEARTBEAT_TYPE)
            deliveries = transport.receive(listener, prefetch=1)
            async with asyncio.timeout(10):
                delivery = await anext(deliveries)
            assert decode_heartbeat(delivery.body).instance == bus.instance
            await delivery.ack()
            await deliveries.aclose()  # type: ignore[attr-defined]
    with sqlite3.connect(tmp_path / "bus.db") as db:
        kept = db.execute("SELECT queue, COUNT(*) FROM tidings_messages GROUP BY queue").fetchall()
    # What is left is in the listener's queue only, published after it was bound.
    assert {queue for queue, _ in kept} <= {listener}


async def test_heartbeats_can_be_turned_off(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    beats = await listen_for_heartbeats(url)
    silent = Bus(unique("silent"), url, heartbeat_interval=None, telemetry=False)
    beating = Bus(unique("beating"), url, heartbeat_interval=0.05, telemetry=False)
    async with running(silent, beating):
        await asyncio.sleep(0.3)
    feed = await read_feed(url, lambda feed: any(beat.stopping for beat in feed.beats), heartbeats=beats)
    assert {beat.service for beat in feed.beats} == {beating.service}
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        Bus("bad", url, heartbeat_interval=0)
