"""The checker's arithmetic on a ledger written by hand (SQLite): each figure counts what it says."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import insert

from tidings.storage import create_tables, outbox_table, utc_now
from tidings.verify import Ledger, check
from tidings.verify.databases import engine_for
from tidings.verify.ledger import OUTBOX, PLAIN


async def test_each_figure_of_the_report(tmp_path: Path) -> None:
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(engine, "t1")
    await create_tables(engine)
    await ledger.create()
    before = time.time()
    await ledger.fault("before the records", before - 2, before - 1)
    await ledger.fault("after them", before + 100, before + 101)
    try:
        async with engine.begin() as connection:
            for seq, (mode, confirmed) in enumerate(
                [(PLAIN, True), (PLAIN, True), (PLAIN, False), (OUTBOX, True), (OUTBOX, True), (PLAIN, True)]
            ):
                await ledger.sent(connection, f"m{seq}", producer=0, seq=seq, mode=mode, confirmed=confirmed)
            await ledger.order(connection, "m3")  # with its outbox row below
            await ledger.order(connection, "m4")  # without: an orphan
            row = {"service": "p", "message_id": "m3", "headers": "{}", "body": b"", "queue": "q"}
            await connection.execute(
                insert(outbox_table), {**row, "transaction_key": 1, "created_at": utc_now()}
            )
            for message_id in ("m0", "m0", "m0", "m1", "m3"):
                await ledger.delivered(connection, message_id)
            for message_id in ("m0", "m1", "m1", "m3"):
                await ledger.effect(connection, message_id, 1)
        report = await check(ledger, service="p", dead_lettered={"m5"})
        # m2 was never confirmed: not required. m4 has no effect: lost. m5 is in the error queue.
        assert (report.sent, report.confirmed, report.handled) == (6, 5, 3)
        assert (report.lost, report.lost_ids) == (1, ("m4",))
        assert report.duplicate_deliveries == 2
        assert report.duplicate_effects == 1
        assert report.dead_lettered == 1
        assert report.orphans == 1
        assert report.unsent == 1  # m3's outbox row is not marked sent
        assert not report.ok
        # A plain confirm and a delivery came after the first fault; nothing after the second.
        first, second = report.recoveries
        assert first.seconds is not None
        assert 1 <= first.seconds < time.time() - before + 1
        assert second.seconds is None
        assert report.verify_line() == (
            "verify: sent 6, handled 3, lost 1, duplicate deliveries 2, duplicate effects 1, dead-lettered 1"
        )
    finally:
        await ledger.drop()
        await engine.dispose()
