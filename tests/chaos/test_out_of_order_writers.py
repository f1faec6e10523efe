"""Eight writers committing out of id order: the relay skips no row.

Eight producer processes write outbox messages in transactions that stay open a random moment
before they commit, so a transaction that took a smaller id often commits after one with a
larger id (PostgreSQL hands out ids at insert, not at commit). The relay ships what is committed
and unsent, whatever its id; the negative control ships with a relay that remembers the last id
it saw and asks for larger ones, which never sees a row committed after a larger one was shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run
from tests.conftest import rabbitmq_system_url, require_server
from tests.sizes import size
from tidings.envelope import Envelope
from tidings.storage import outbox_table, utc_now
from tidings.transports import transport_from_url
from tidings.verify import Run

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.timeout(900)]

WRITERS = 8


def writers(tmp_path: Path, **settings: object) -> contextlib.AbstractAsyncContextManager[Run]:
    require_server("PostgreSQL", ("127.0.0.1", 5432))
    return ledger_run(
        tmp_path, transport=rabbitmq_system_url("writers"), database=POSTGRES,
        messages=size(200, 6000), producers=WRITERS, mode="outbox", commit_delay=0.05,
        rate=size(200, 100), **settings,
    )  # fmt: skip


async def test_eight_writers_committing_out_of_id_order_lose_no_row(tmp_path: Path) -> None:
    async with writers(tmp_path) as run:
        report = await finish(run, what="out-of-order writers")
    assert report.lost == 0
    assert report.orphans == 0
    assert report.unsent == 0
    assert report.duplicate_effects == 0
    assert report.handled == report.confirmed == report.sent


async def naive_relay(run: Run) -> None:
    """Ships rows with an id above the last one it shipped: the bug the real relay must not have."""
    columns = outbox_table.c
    last = 0
    async with transport_from_url(run.settings.transport) as transport:
        while True:
            query = select(columns.id, columns.headers, columns.body, columns.queue).where(
                columns.service == run.producer_service, columns.id > last
            )
            async with run.engine.connect() as connection:
                rows = (await connection.execute(query.order_by(columns.id))).all()
            for row in rows:
                await transport.send(Envelope.from_headers(json.loads(row.headers), row.body), row.queue)
                async with run.engine.begin() as connection:
                    await connection.execute(
                        update(outbox_table).where(columns.id == row.id).values(sent_at=utc_now())
                    )
                last = row.id
            await asyncio.sleep(0.01)


@full_only
async def test_negative_control_a_relay_that_remembers_the_last_id_loses_rows(tmp_path: Path) -> None:
    async with writers(tmp_path, relay=False) as run:
        relaying = asyncio.create_task(naive_relay(run))
        try:
            report = await finish(run, patience=3, what="out-of-order writers, naive relay")
        finally:
            relaying.cancel()
            await asyncio.gather(relaying, return_exceptions=True)
    assert report.unsent > 0  # committed after a larger id was shipped: never seen
    assert report.lost > 0
