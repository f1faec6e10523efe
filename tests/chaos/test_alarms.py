"""A broker memory alarm for 60 s: publishers blocked, consumers keep consuming, the outbox backlog
grows in the database and drains after, the relay's memory stays bounded.

On a private RabbitMQ node: `set_vm_memory_high_watermark` far below what the node uses raises
the memory alarm, which blocks every connection that publishes; restoring it clears the alarm.
The producers send through the outbox (their relay is the publisher the alarm blocks); the
consumers are slow (a handler takes 200 ms, two at a time in each of two consumers: 20 a second),
so that the queue holds a backlog for them to consume while publishing is blocked. The negative
control counts plain sends as confirmed before the broker did and SIGKILLs the producers
during the alarm: what they held, blocked, is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run, made_progress
from tests.chaos.private_node import PrivateNode
from tests.conftest import POSTGRES_HOST, require_server, unique
from tidings.verify import Run
from tidings.verify.run import Progress

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900), full_only]

#: Seconds the alarm lasts.
ALARM = 60.0


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with PrivateNode.started() as node:
        yield node


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB (0 when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


async def under_alarm(
    run: Run, node: PrivateNode, *, kill_producers: bool = False
) -> tuple[Progress, Progress, int]:
    """Raise the memory alarm for ALARM seconds; the progress at its start and end, and the most
    memory a producer (its relay) held during it, in KiB."""
    peak = 0
    async with run.fault("memory alarm"):
        await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            await asyncio.sleep(2)  # the alarm takes effect
            start = await run.progress()
            loop = asyncio.get_running_loop()
            until = loop.time() + ALARM
            while loop.time() < until:
                peak = max([peak, *(rss_kib(pid) for pid in run.pids("producer"))])
                if kill_producers and loop.time() > until - ALARM / 2:
                    for index in range(len(run.producers)):
                        run.kill_producer(index)
                    kill_producers = False
                await asyncio.sleep(1)
            end = await run.progress()
        finally:
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
    return start, end, peak


async def test_a_memory_alarm_blocks_publishers_not_consumers_and_the_outbox_drains_after(
    tmp_path: Path, node: PrivateNode
) -> None:
    require_server("PostgreSQL", POSTGRES_HOST)
    async with ledger_run(
        tmp_path, transport=node.url(namespace=unique("alarm")), database=POSTGRES,
        messages=1500, rate=100, mode="outbox", handler_delay=0.2, concurrency=2,
    ) as run:  # fmt: skip
        await made_progress(run, 100)
        before = max(rss_kib(pid) for pid in run.pids("producer"))
        start, end, peak = await under_alarm(run, node)
        report = await finish(run, patience=60, what="memory alarm")
    print(
        f"during the alarm: handled {start.handled} -> {end.handled}, outbox backlog {start.unsent} -> "
        f"{end.unsent}; producer memory {before} KiB before, at most {peak} KiB during"
    )
    assert end.handled > start.handled  # consumers kept consuming
    assert end.unsent > start.unsent  # the outbox backlog grew in the database (publishing blocked)
    assert report.unsent == 0  # and drained after
    assert peak < before + 100 * 1024  # the relay does not pile up what it cannot ship
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.dead_lettered == 0
    assert report.handled == report.confirmed


async def test_negative_control_sends_counted_before_their_confirm_die_with_a_blocked_producer(
    tmp_path: Path, node: PrivateNode
) -> None:
    require_server("PostgreSQL", POSTGRES_HOST)
    async with ledger_run(
        tmp_path, transport=node.url(namespace=unique("alarm")), database=POSTGRES, messages=1000,
        rate=100, mode="plain", producer_control="unconfirmed",
    ) as run:  # fmt: skip
        await made_progress(run, 100)
        await under_alarm(run, node, kill_producers=True)
        report = await finish(run, patience=30, what="memory alarm, unconfirmed")
    assert report.lost > 0
