"""PostgreSQL crashing (`pg_ctl stop -m immediate`) and starting again, three times, under the outbox
and the inbox: no business row without its outbox row, no ack without an inbox row (no confirmed
message without its effect), no message dead-lettered because of the outage.

On a private cluster (`private_postgres.py`), with the shared broker. While the database is down
the producers cannot commit (they wait and try again; a commit whose answer was lost is found
done), the relay backs off, and the consumers put deliveries back for later. The negative control
acknowledges before the effect: the effects due during an outage are lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import full_only
from tests.chaos.ledger import finish, ledger_run, made_progress
from tests.chaos.private_postgres import PrivatePostgres
from tests.conftest import rabbitmq_system_url
from tests.sizes import size
from tidings.verify import Report

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(900)]

#: Seconds the database stays down each time.
OUTAGE = 3.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivatePostgres]:
    with PrivatePostgres.started() as cluster:
        yield cluster


async def crash_during_stream(
    tmp_path: Path, cluster: PrivatePostgres, crashes: int, **settings: object
) -> Report:
    async with ledger_run(
        tmp_path, transport=rabbitmq_system_url("pgcrash"), database=cluster.url, rate=100, **settings
    ) as run:
        try:
            for _ in range(crashes):
                await made_progress(run, 30)
                await asyncio.sleep(random.uniform(0, 1))
                async with run.fault("postgres crash"):
                    await asyncio.to_thread(cluster.crash)
                    await asyncio.sleep(OUTAGE)
                    await asyncio.to_thread(cluster.start)
            return await finish(run, patience=20, what="postgres crash")
        finally:
            if not cluster.running():
                await asyncio.to_thread(cluster.start)  # running again for the teardown, whatever happened


@full_only
async def test_postgres_crashing_under_the_outbox_and_inbox_loses_nothing(
    tmp_path: Path, cluster: PrivatePostgres
) -> None:
    report = await crash_during_stream(tmp_path, cluster, 3, messages=size(600, 6000))
    assert report.orphans == 0  # no business row without its outbox row
    assert report.lost == 0  # no confirmed message acknowledged without its effect and inbox row
    assert report.dead_lettered == 0
    assert report.duplicate_effects == 0
    assert report.handled == report.confirmed


@full_only
async def test_negative_control_acknowledging_before_the_effect_loses_effects_in_a_crash(
    tmp_path: Path, cluster: PrivatePostgres
) -> None:
    report = await crash_during_stream(
        tmp_path, cluster, 1, messages=size(300, 2000), consumer_control="ack-before-effect"
    )
    assert report.lost > 0
