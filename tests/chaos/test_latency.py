"""200 ms added each way between tidings and the broker: confirms stay pipelined.

Every process of the run reaches the broker through a TCP proxy that delays each chunk 200 ms each
way (a round trip of 400 ms more), without limiting throughput. One producer keeps `WINDOW` plain
sends waiting for their confirms at once: if the confirms are pipelined the run confirms about
WINDOW messages per round trip, far above the one per round trip of a publisher that waits for
each confirm before the next send, which is the negative control (a window of 1).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run
from tests.conftest import rabbitmq_system_url, require_server
from tests.sizes import size
from tests.tcp_proxy import TcpProxy
from tidings.verify import Report

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(900),
    full_only,
]

LATENCY = 0.2
ROUND_TRIP = 2 * LATENCY
#: Well below what the producer manages without latency on a busy machine (~50/s), so the latency
#: is what limits the run.
WINDOW = 10


async def through_latency(tmp_path: Path, messages: int, window: int) -> Report:
    require_server("PostgreSQL", ("127.0.0.1", 5432))
    url = rabbitmq_system_url("latency")
    target = urlsplit(url)
    proxy = TcpProxy((target.hostname or "127.0.0.1", target.port or 5672), latency=LATENCY)
    await proxy.start()
    try:
        async with ledger_run(
            tmp_path, transport=proxy.rewrite(url), database=POSTGRES, messages=messages,
            producers=1, consumers=1, mode="plain", in_flight=window, concurrency=20,
        ) as run:  # fmt: skip
            report = await finish(run, what=f"latency {LATENCY * 1000:.0f} ms each way, window {window}")
    finally:
        await proxy.stop()
    bound = window / ROUND_TRIP
    print(f"throughput {report.throughput:.1f}/s; window / round trip = {bound:.1f}/s")
    return report


async def test_confirms_stay_pipelined_through_200_ms_each_way(tmp_path: Path) -> None:
    report = await through_latency(tmp_path, size(1500, 1500), WINDOW)
    assert report.lost == 0
    assert report.handled == report.confirmed == report.sent
    # Pipelined: most of the window in flight each round trip (a confirm at a time: 1 / round trip).
    assert report.throughput > WINDOW / ROUND_TRIP / 2


async def test_negative_control_a_window_of_one_confirm_is_one_round_trip_a_message(tmp_path: Path) -> None:
    report = await through_latency(tmp_path, 10, 1)
    assert report.throughput < WINDOW / ROUND_TRIP / 2
