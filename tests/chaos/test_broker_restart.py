"""A broker restarted (`stop_app`/`start_app`) or SIGKILLed three times during a stream: nothing lost.

On a private RabbitMQ node (`private_node.py`): the shared broker is never stopped. Producers (plain
sends and the outbox) and consumers keep running through each outage; the harness starts again a
process that could not connect. The negative control counts plain sends as confirmed before the
broker confirmed them, and never sends them again: those in flight at an outage are lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run, made_progress
from tests.chaos.private_node import PrivateNode
from tests.conftest import POSTGRES_HOST, require_server, unique
from tests.sizes import FULL, size
from tidings.verify import Report, Run

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900)]

#: Seconds the broker stays down each time.
OUTAGE = 2.0


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with PrivateNode.started() as node:
        yield node


async def restart(node: PrivateNode) -> None:
    await asyncio.to_thread(node.stop_app)
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(node.start_app)


async def sigkill(node: PrivateNode) -> None:
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(node.start)


FAULTS = {"restart": restart, "sigkill": sigkill}


async def stream_through(
    tmp_path: Path, node: PrivateNode, fault: str, faults: int, messages: int, **settings: object
) -> tuple[Report, Run]:
    require_server("PostgreSQL", POSTGRES_HOST)
    url = node.url(namespace=unique("restart"))
    async with ledger_run(
        tmp_path, transport=url, database=POSTGRES, messages=messages, rate=100, **settings
    ) as run:
        try:
            for _ in range(faults):
                await made_progress(run, 30)
                await asyncio.sleep(random.uniform(0, 1))
                async with run.fault(f"broker {fault}"):
                    await FAULTS[fault](node)
            report = await finish(run, patience=15, what=f"broker {fault}")
        finally:
            if not await asyncio.to_thread(node.running):
                await asyncio.to_thread(node.start)  # the broker running again, whatever happened
    return report, run


@pytest.mark.parametrize(
    "fault",
    ["restart", pytest.param("sigkill", marks=pytest.mark.skipif(not FULL, reason="full sizes only"))],
)
async def test_a_broker_restarted_or_killed_during_a_stream_loses_nothing(
    tmp_path: Path, node: PrivateNode, fault: str
) -> None:
    report, _ = await stream_through(tmp_path, node, fault, size(1, 3), size(200, 6000))
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.dead_lettered == 0
    assert report.handled == report.confirmed == report.sent


@full_only
async def test_negative_control_sends_counted_before_their_confirm_are_lost_in_a_restart(
    tmp_path: Path, node: PrivateNode
) -> None:
    report, _ = await stream_through(
        tmp_path,
        node,
        "restart",
        1,
        size(300, 2000),
        mode="plain",
        producer_control="unconfirmed",
        in_flight=50,
    )
    assert report.lost > 0
