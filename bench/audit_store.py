"""The dashboard's store: ingestion rate, the conversation page with 1,000,000 records, retention.

    .venv/bin/python bench/audit_store.py                    # all three on SQLite
    .venv/bin/python bench/audit_store.py --records 1000000 --keep /tmp/dashboard-1m.db

1. Ingestion: records/s into the store (`Store.add_records`, batches of 200 as the buses send
   them), and through the whole path, the audit queue on a SQLite transport consumed by `Ingest`;
   with the process's CPU time a record (all its threads: the loop, aiosqlite's, the transport's),
   the figure that moves least when other work shares the machine.
2. The conversation page: the store filled with `--records` records (conversations of 12), then
   `GET /conversation?id=...` through the dashboard's application (query, diagram, template) for
   conversations picked at random: p50 and worst of 50 answers, and the search by message id.
3. Retention: 200,000 records past their time deleted in batches while ingestion goes on: how long
   it took, and the longest an ingestion batch waited meanwhile against before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tidings.audit import RECORDS_TYPE, AuditRecord
from tidings.audit.records import RECORD_FIELDS, encode_records
from tidings.dashboard.app import Parts, make_app
from tidings.dashboard.failed import FailedMessages
from tidings.dashboard.ingest import Ingest
from tidings.dashboard.live import Live
from tidings.dashboard.retention import Retention
from tidings.dashboard.security import Guard
from tidings.dashboard.store import Store
from tidings.envelope import Envelope
from tidings.transports import transport_from_url

SERVICES = ["gateway", "basket", "ordering", "catalog", "payment"]
BODY = json.dumps({"order_id": "order-0123456789ab", "buyer": "alice", "amount": "16.00"})


def make_record(n: int, conversation: int, at: float) -> AuditRecord:
    return AuditRecord(
        message_id=f"m-{n:09d}",
        type="ordering.place-order",
        source=SERVICES[n % 5],
        service=SERVICES[(n + 1) % 5],
        queue=SERVICES[(n + 1) % 5],
        instance="bench-1",
        outcome="handled",
        correlation_id=f"conv-{conversation:08d}",
        causation_id=f"m-{n - 1:09d}" if n % 12 else None,
        sent_at=at,
        processed_at=at + 0.001,
        duration_ms=3.5,
        headers={"id": f"m-{n:09d}", "type": "ordering.place-order"},
        body=BODY,
        body_size=len(BODY),
    )


async def ingestion(directory: Path, count: int) -> None:
    store = await Store.open(f"sqlite:///{directory / 'ingest.db'}")
    now = time.time()
    batches = [
        [make_record(n, n // 12, now) for n in range(start, start + 200)] for start in range(0, count, 200)
    ]
    started, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        await store.add_records(batch)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"store.add_records: {count:,} records in batches of 200: {count / elapsed:,.0f} records/s "
        f"({cpu / count * 1e6:.0f} µs of CPU a record, every thread of the process)"
    )
    await store.close()

    # The whole path: batches waiting on the audit queue of a SQLite transport, ingested.
    store = await Store.open(f"sqlite:///{directory / 'ingest-path.db'}")
    url = f"sqlite:///{directory / 'bus.db'}"
    async with transport_from_url(url) as transport:
        await transport.declare_queue("tidings.audit")
        for batch in batches:
            rows = [[getattr(r, name) for name in RECORD_FIELDS] for r in batch]
            envelope = Envelope(type=RECORDS_TYPE, source="bench", body=encode_records(rows))
            await transport.send(envelope, "tidings.audit")
        ingest = Ingest(transport, store, Live(), queue="tidings.audit")
        started, cpu = time.perf_counter(), time.process_time()
        task = asyncio.create_task(ingest.run())
        while ingest.records < count:  # noqa: ASYNC110 (a counter, not an event, says when)
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print(
        f"audit queue -> Ingest -> store (SQLite transport and store): {count / elapsed:,.0f} records/s "
        f"({cpu / count * 1e6:.0f} µs of CPU a record; {ingest.transactions} transactions for "
        f"{len(batches)} batches)"
    )
    await store.close()


def fill(path: Path, count: int) -> None:
    """`count` records straight into the store's table (the store made its schema first)."""
    connection = sqlite3.connect(path)
    existing = connection.execute("SELECT count(*) FROM dashboard_messages").fetchone()[0]
    if existing >= count:
        return
    now = time.time() - 3600
    columns = [name for name in RECORD_FIELDS]
    insert = f"INSERT INTO dashboard_messages ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    step = 50_000
    for start in range(existing, count, step):
        rows = []
        for n in range(start, min(start + step, count)):
            record = make_record(n, n // 12, now + n * 0.001)
            row = [getattr(record, name) for name in columns]
            row[columns.index("headers")] = json.dumps(record.headers)
            rows.append(row)
        with connection:
            connection.executemany(insert, rows)
    connection.close()


async def conversation_page(path: Path, count: int) -> None:
    store = await Store.open(f"sqlite:///{path}")
    started = time.perf_counter()
    fill(path, count)
    print(f"filled the store with {await store.count():,} records ({time.perf_counter() - started:.0f} s)")
    async with transport_from_url(f"memory://bench-{random.random()}") as transport:
        app = make_app(Parts(store, FailedMessages(transport), Live(), Guard(None), "bench"))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client:
            times = []
            for _ in range(50):
                conversation = random.randrange(count // 12)
                started = time.perf_counter()
                response = await client.get(f"/conversation?id=conv-{conversation:08d}")
                times.append(time.perf_counter() - started)
                assert response.status_code == 200
                assert response.text.count('class="arrow') == 12
            p50, worst = statistics.median(times) * 1000, max(times) * 1000
            print(
                f"GET /conversation (12 messages), {count:,} records: p50 {p50:.1f} ms, worst {worst:.1f} ms"
            )
            times = []
            for _ in range(20):
                n = random.randrange(count)
                started = time.perf_counter()
                response = await client.get(f"/conversations?q=m-{n:09d}")
                times.append(time.perf_counter() - started)
                assert response.status_code == 303
            p50, worst = statistics.median(times) * 1000, max(times) * 1000
            print(f"find by message id: p50 {p50:.1f} ms, worst {worst:.1f} ms")
    await store.close()


async def retention(directory: Path) -> None:
    store = await Store.open(f"sqlite:///{directory / 'retention.db'}")
    old = time.time() - 10 * 86400
    for start in range(0, 200_000, 2000):
        await store.add_records([make_record(n, n // 12, old) for n in range(start, start + 2000)])

    async def ingest_for(seconds: float, waits: list[float]) -> None:
        deadline = time.perf_counter() + seconds
        n = 10_000_000
        while time.perf_counter() < deadline:
            batch = [make_record(n + i, (n + i) // 12, time.time()) for i in range(200)]
            started = time.perf_counter()
            await store.add_records(batch)
            waits.append(time.perf_counter() - started)
            n += 200
            await asyncio.sleep(0.02)

    before: list[float] = []
    await ingest_for(2.0, before)
    during: list[float] = []
    ingesting = asyncio.create_task(ingest_for(3600, during))
    started = time.perf_counter()
    deleted = await Retention(store, keep=86400).once()
    took = time.perf_counter() - started
    ingesting.cancel()
    await asyncio.gather(ingesting, return_exceptions=True)
    print(
        f"retention: {deleted:,} records deleted in batches of 2,000 in {took:.1f} s while ingesting; "
        f"an ingestion batch took p50 {statistics.median(during) * 1000:.1f} ms / worst "
        f"{max(during) * 1000:.1f} ms meanwhile ({len(during)} batches), p50 "
        f"{statistics.median(before) * 1000:.1f} ms / worst {max(before) * 1000:.1f} ms before"
    )
    await store.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        await ingestion(directory, args.ingest)
        await conversation_page(args.keep or directory / "big.db", args.records)
        await retention(directory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ingest", type=int, default=40_000, help="records for the ingestion rate")
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the store for the page")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the big store here")
    asyncio.run(main(parser.parse_args()))
