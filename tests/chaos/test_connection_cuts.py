"""Connections cut between tidings and the broker, mid-publish and mid-confirm: nothing lost.

Every process of the run (producers with their relays, consumers) reaches the broker through a TCP
proxy. About every second the proxy drops every connection: half of the time at once, with
publishes on their way to the broker (mid-publish), half of the time after holding back what the
broker sends for a moment, so that the confirms of publishes that did arrive are lost with the
connection (mid-confirm). The negative control counts a plain send as confirmed before the broker
did and never sends it again: what a cut drops is then lost.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run, made_progress
from tests.conftest import rabbitmq_system_url, require_server
from tests.sizes import size
from tests.tcp_proxy import TcpProxy
from tidings.verify import Report, Run

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.timeout(900)]

#: Seconds each chunk spends in the proxy each way: publishes and confirms are in flight at a cut.
LATENCY = 0.02


async def cut_while_streaming(run: Run, proxy: TcpProxy, rng: random.Random) -> int:
    """Cut 0.5-1.5 s after the run made progress again, until the producers are done; returns the cuts.

    Waiting for progress lets processes that a cut caught while they started come up again (a
    first connection that fails ends the process; the harness starts it again).
    """
    cuts = 0
    while not run.producers_done:
        await made_progress(run)
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        mid_confirm = cuts % 2 == 1
        async with run.fault("cut mid-confirm" if mid_confirm else "cut mid-publish"):
            if mid_confirm:
                # What the broker sends (confirms among it) waits; publishes still go through.
                proxy.downstream_latency = 0.5
                await asyncio.sleep(0.3)
            proxy.cut()
            proxy.downstream_latency = LATENCY
        cuts += 1
    return cuts


async def stream_through_cuts(tmp_path: Path, messages: int, **settings: object) -> tuple[Report, int]:
    require_server("PostgreSQL", ("127.0.0.1", 5432))
    url = rabbitmq_system_url("cuts")
    target = urlsplit(url)
    seed = random.randrange(2**32)
    print(f"\nseed {seed}")
    proxy = TcpProxy((target.hostname or "127.0.0.1", target.port or 5672), latency=LATENCY)
    await proxy.start()
    try:
        async with ledger_run(
            tmp_path, transport=proxy.rewrite(url), database=POSTGRES, messages=messages, rate=100, **settings
        ) as run:
            cuts = await cut_while_streaming(run, proxy, random.Random(seed))
            report = await finish(run, patience=10, what="connection cuts")
    finally:
        await proxy.stop()
    return report, cuts


async def test_connections_cut_mid_publish_and_mid_confirm_lose_nothing(tmp_path: Path) -> None:
    report, cuts = await stream_through_cuts(tmp_path, size(200, 3000))
    assert cuts >= 2
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.dead_lettered == 0
    assert report.handled == report.confirmed == report.sent


@full_only
async def test_negative_control_sends_counted_before_their_confirm_are_lost_in_cuts(tmp_path: Path) -> None:
    report, _ = await stream_through_cuts(
        tmp_path, size(300, 2000), mode="plain", producer_control="unconfirmed", in_flight=50
    )
    assert report.lost > 0
