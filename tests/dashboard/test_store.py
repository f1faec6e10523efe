"""The dashboard's store on SQLite and PostgreSQL: records in batches, conversations, search,
heartbeats kept newest-first (one by one and several in one transaction), and retention deleting
in batches while ingestion goes on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_HOST, require_server
from tests.dashboard.records import record
from tidings.audit import Heartbeat
from tidings.dashboard.retention import Retention
from tidings.dashboard.schema import metadata
from tidings.dashboard.store import Store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened = await Store.open(f"sqlite:///{tmp_path / 'dashboard.db'}")
    else:
        require_server("PostgreSQL", POSTGRES_HOST)
        opened = await Store.open("postgresql://postgres@127.0.0.1:5432/test")
        async with opened.engine.begin() as connection:  # a clean slate in the shared database
            await connection.run_sync(metadata.drop_all)
            await connection.run_sync(metadata.create_all)
    try:
        yield opened
    finally:
        if request.param == "postgres":
            async with opened.engine.begin() as connection:
                await connection.run_sync(metadata.drop_all)
        await opened.close()


async def test_records_are_found_by_conversation_message_id_and_body_value(store: Store) -> None:
    await store.add_records(
        [
            record(message_id="m1", correlation_id="c1", type="PlaceOrder", body='{"order_id": "order-7"}'),
            record(message_id="m2", correlation_id="c1", causation_id="m1", service="c"),
            record(message_id="m3", correlation_id="c2", body='{"order_id": "order-8_x%"}'),
        ]
    )
    conversation = await store.conversation("c1")
    assert [s.record.message_id for s in conversation] == ["m1", "m2"]
    assert conversation[0].record.body == '{"order_id": "order-7"}'
    assert await store.find("m3") == ["c2"]
    assert await store.find("c1") == ["c1"]
    assert await store.find("order-7") == ["c1"]
    # LIKE's wildcards in the value are taken literally.
    assert await store.find("8_x%") == ["c2"]
    assert await store.find("order") == ["c2", "c1"]  # newest first
    assert await store.find("order-9") == []
    first = await store.first_records(["c1", "c2"])
    assert (first["c1"].record.message_id, first["c2"].record.message_id) == ("m1", "m3")
    assert await store.services() == ["b", "c"]
    counts, durations = await store.window(0.0)
    assert sorted(counts) == [("b", "handled", 2), ("c", "handled", 1)]
    assert sorted(durations) == [("b", 1.0), ("b", 1.0), ("c", 1.0)]
    stored = await store.record(conversation[1].id)
    assert stored is not None
    assert stored.record.causation_id == "m1"


async def test_an_instance_keeps_its_newest_heartbeat(store: Store) -> None:
    def beat(sent_at: float, handled: int) -> Heartbeat:
        return Heartbeat(
            service="basket",
            instance="i-1",
            host="h",
            pid=1,
            version="0.1.0",
            started_at=0.0,
            sent_at=sent_at,
            interval=5.0,
            counters={"handled": handled},
            outbox_backlog=3,
        )

    await store.add_heartbeat(beat(10.0, 1))
    await store.add_heartbeat(beat(20.0, 2))
    await store.add_heartbeat(beat(15.0, 9))  # late, and older than what is kept
    (kept,) = await store.instances()
    assert (kept.sent_at, kept.counters, kept.outbox_backlog) == (20.0, {"handled": 2}, 3)
    assert await store.services() == ["basket"]


async def test_records_and_heartbeats_of_several_messages_are_stored_in_one_call(store: Store) -> None:
    def beat(instance: str, sent_at: float, handled: int) -> Heartbeat:
        return Heartbeat(
            service="basket",
            instance=instance,
            host="h",
            pid=1,
            version=None,
            started_at=0.0,
            sent_at=sent_at,
            interval=5.0,
            counters={"handled": handled},
        )

    # Whole numbers where the columns are floats, as JSON from a bus may have them.
    records = [
        record(message_id=f"m{i}", correlation_id="c", processed_at=100 + i, duration_ms=2) for i in range(3)
    ]
    # Two beats of one instance in one group (ingestion's): the newer is kept, whatever the order.
    await store.add(records, [beat("i-1", 20.0, 2), beat("i-2", 5.0, 7), beat("i-1", 10.0, 1)])
    assert [s.record.message_id for s in await store.conversation("c")] == ["m0", "m1", "m2"]
    assert [(b.instance, b.counters["handled"]) for b in await store.instances()] == [("i-1", 2), ("i-2", 7)]
    assert await store.services() == ["b", "basket"]
    (stored,) = await store.deliveries_of("m2")
    assert (stored.record.processed_at, stored.record.duration_ms) == (102.0, 2.0)


async def test_retention_deletes_old_records_in_batches_while_ingestion_goes_on(store: Store) -> None:
    now = time.time()
    old = now - 3600
    for start in range(0, 3000, 500):
        await store.add_records(
            [record(message_id=f"old-{i}", processed_at=old) for i in range(start, start + 500)]
        )
    retention = Retention(store, keep=600, batch=200, pause=0.01)
    written: list[float] = []

    async def ingest() -> None:
        for n in range(20):
            await store.add_records([record(message_id=f"new-{n}-{i}", processed_at=now) for i in range(50)])
            written.append(time.monotonic())
            await asyncio.sleep(0.005)

    ingesting = asyncio.create_task(ingest())
    deleted = await retention.once(now=now)
    finished = time.monotonic()
    await ingesting
    assert deleted == 3000
    assert await store.count() == 20 * 50  # every new record, none of the old
    # Ingestion was not held back until the delete was over: batches committed in between.
    assert any(moment < finished for moment in written)
