"""Ingestion from a real audit queue (SQLite transport) into the store: batches and heartbeats
stored and acknowledged, bad input dead-lettered with a reason; what a message carried is shown
escaped on the pages; messages waiting stored in one transaction, and all left on the queue when
the store fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.dashboard.records import record
from tidings.audit import HEARTBEAT_TYPE, RECORDS_TYPE, AuditRecord, Heartbeat
from tidings.audit.records import RECORD_FIELDS, encode_heartbeat, encode_records
from tidings.dashboard.app import Parts, make_app
from tidings.dashboard.failed import FailedMessages
from tidings.dashboard.ingest import Ingest
from tidings.dashboard.live import Live
from tidings.dashboard.schema import metadata
from tidings.dashboard.security import Guard
from tidings.dashboard.store import Store
from tidings.envelope import Envelope
from tidings.transports import transport_from_url

HOSTILE = '{"note": "<script>alert(1)</script>"}'


async def test_batches_are_stored_bad_input_is_dead_lettered_and_pages_escape(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'dashboard.db'}")
    async with transport_from_url(f"sqlite:///{tmp_path / 'bus.db'}") as transport:
        await transport.declare_queue("tidings.audit")
        when = {"time": "2026-12-02T10:00:00Z"}  # as a bus sends it: sent_at left to the reader
        stored = record(message_id="m1", correlation_id="c1", body=HOSTILE, headers=when, sent_at=None)
        row = [getattr(stored, name) for name in RECORD_FIELDS]
        batch = Envelope(type=RECORDS_TYPE, source="shop", body=encode_records([row]))
        await transport.send(batch, "tidings.audit")
        await transport.send(Envelope(type=HEARTBEAT_TYPE, source="shop", body=b"[1, 2]"), "tidings.audit")
        await transport.send(Envelope(type="something-else", source="x", body=b"{}"), "tidings.audit")
        live = Live()
        ingest = Ingest(transport, store, live, queue="tidings.audit")
        task = asyncio.create_task(ingest.run())
        try:
            async with asyncio.timeout(10):
                while ingest.records + ingest.refused < 3:  # noqa: ASYNC110 (counters, not events)
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert (ingest.records, ingest.refused) == (1, 2)
        refused = await transport.dead_letters("tidings.audit")
        assert [letter.headers["tidings-fault-reason"] for letter in refused] == ["invalid-payload"] * 2
        (kept,) = await store.conversation("c1")
        # Read from the time header at ingestion.
        assert kept.record.sent_at == datetime(2026, 12, 2, 10, tzinfo=UTC).timestamp()

        app = make_app(Parts(store, FailedMessages(transport), live, Guard(None), "test"))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://dash"
        ) as client:
            page = (await client.get(f"/message/{kept.id}")).text
    await store.close()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def _batch(*records: AuditRecord) -> Envelope:
    rows = [[getattr(r, name) for name in RECORD_FIELDS] for r in records]
    return Envelope(type=RECORDS_TYPE, source="shop", body=encode_records(rows))


def _left_on(path: Path, queue: str) -> int:
    """Messages still in `queue` of a SQLite transport's file (read once the transport closed)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return int(
            connection.execute("SELECT count(*) FROM tidings_messages WHERE queue = ?", (queue,)).fetchone()[
                0
            ]
        )


async def _ingest_until(ingest: Ingest, done: Callable[[], bool], *, timeout: float = 10.0) -> None:
    task = asyncio.create_task(ingest.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():  # noqa: ASYNC110 (counters, not events)
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_messages_waiting_are_stored_in_one_transaction_then_each_acknowledged(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'dashboard.db'}")
    async with transport_from_url(f"sqlite:///{tmp_path / 'bus.db'}") as transport:
        await transport.declare_queue("tidings.audit")
        for n in range(4):
            await transport.send(
                _batch(*(record(message_id=f"m{n}-{i}", correlation_id=f"c{n}") for i in range(50))),
                "tidings.audit",
            )
        beat = Heartbeat(
            service="basket",
            instance="i-1",
            host="h",
            pid=1,
            version=None,
            started_at=0.0,
            sent_at=1.0,
            interval=5.0,
        )
        await transport.send(
            Envelope(type=HEARTBEAT_TYPE, source="shop", body=encode_heartbeat(beat)), "tidings.audit"
        )
        await transport.send(Envelope(type="something-else", source="x", body=b"{}"), "tidings.audit")
        ingest = Ingest(transport, store, Live(), queue="tidings.audit")
        await _ingest_until(ingest, lambda: ingest.records + ingest.heartbeats + ingest.refused == 202)
        assert (ingest.records, ingest.heartbeats, ingest.refused) == (200, 1, 1)
        # All six were waiting, so taken together: the five stored in one transaction.
        assert ingest.transactions == 1
        assert [letter.headers["type"] for letter in await transport.dead_letters("tidings.audit")] == [
            "something-else"
        ]
    await store.close()
    # Every one acknowledged (or dead-lettered): none left on the queue.
    assert _left_on(tmp_path / "bus.db", "tidings.audit") == 0
    store = await Store.open(f"sqlite:///{tmp_path / 'dashboard.db'}")
    try:
        stored = [s.record.message_id for s in await store.recent(limit=1000)][::-1]
        assert stored == [f"m{n}-{i}" for n in range(4) for i in range(50)]  # in the queue's order
        assert [b.instance for b in await store.instances()] == ["i-1"]
    finally:
        await store.close()


async def test_a_store_that_fails_leaves_every_message_of_the_group_on_the_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tidings.dashboard")
    path = tmp_path / "dashboard.db"
    store = await Store.open(f"sqlite:///{path}")
    # A real failure of the store's database: its records' table is gone.
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("DROP TABLE dashboard_messages")
    # A message this transport claimed and did not give back would stay held by it (its claims
    # are renewed while it lives): only released ones can be ingested again below.
    async with transport_from_url(f"sqlite:///{tmp_path / 'bus.db'}?visibility_timeout=60") as transport:
        await transport.declare_queue("tidings.audit")
        for n in range(3):
            await transport.send(
                _batch(*(record(message_id=f"m{n}-{i}") for i in range(10))), "tidings.audit"
            )
        ingest = Ingest(transport, store, Live(), queue="tidings.audit")
        task = asyncio.create_task(ingest.run())
        try:
            async with asyncio.timeout(10):
                while "no such table" not in caplog.text:  # noqa: ASYNC110 (a log line, not an event)
                    await asyncio.sleep(0.02)
                assert (ingest.records, ingest.transactions) == (0, 0)
                async with store.engine.begin() as connection:  # the table back, ingestion backing off
                    await connection.run_sync(metadata.create_all)
                while ingest.records < 30:  # noqa: ASYNC110 (a counter, not an event)
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # The same three, once each (nothing acknowledged before it was stored), in order.
        stored = [s.record.message_id for s in await store.recent(limit=100)][::-1]
        assert stored == [f"m{n}-{i}" for n in range(3) for i in range(10)]
    await store.close()
    assert _left_on(tmp_path / "bus.db", "tidings.audit") == 0
