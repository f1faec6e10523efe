"""Ingestion from a real audit queue (SQLite transport) into the store: batches and heartbeats
stored and acknowledged, bad input dead-lettered with a reason; what a message carried is shown
escaped on the pages."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.dashboard.records import record
from tidings.audit import HEARTBEAT_TYPE, RECORDS_TYPE
from tidings.audit.records import RECORD_FIELDS, encode_records
from tidings.dashboard.app import Parts, make_app
from tidings.dashboard.failed import FailedMessages
from tidings.dashboard.ingest import Ingest
from tidings.dashboard.live import Live
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
