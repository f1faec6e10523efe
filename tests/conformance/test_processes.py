"""Semantics across real OS processes: instances competing, kill -9, durability of a publish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance.test_semantics import PlaceOrder, PriceChanged
from tests.helpers import Processes, eventually
from tidings import Bus

ROOT = Path(__file__).resolve().parents[2]


class Apps(Processes):
    """The conformance app (`tests.conformance.app`) as OS processes, none outliving the test."""

    def start_app(self, *args: str) -> subprocess.Popen[str]:
        return self.start("tests.conformance.app", *args)


@pytest.fixture
def processes() -> Iterator[Apps]:
    running = Apps()
    try:
        yield running
    finally:
        running.stop_all()


def lines(out: Path) -> list[list[str]]:
    return [line.split() for line in out.read_text().splitlines()] if out.exists() else []


async def test_instances_in_separate_processes_share_the_work_once_per_service(
    durable_url: str, name: Callable[[str], str], tmp_path: Path, processes: Apps
) -> None:
    out = tmp_path / "handled.txt"
    basket, search = name("basket"), name("search")
    for service in (basket, basket, basket, search):
        processes.start_app(durable_url, service, str(out))

    async with Bus(name("catalog"), durable_url) as catalog:
        for seq in range(100):
            await catalog.publish(PriceChanged(product_id=1, seq=seq))
    await eventually(lambda: len(lines(out)) >= 200, timeout=30)
    processes.stop_all()  # a clean stop settles everything: no copy may show up later

    handled = Counter((service, seq) for service, _pid, _kind, seq in lines(out))
    assert handled == Counter({(s, str(seq)): 1 for s in (basket, search) for seq in range(100)})
    assert all(p.returncode == 0 for p in processes.started)


async def test_a_message_whose_consumer_is_killed_mid_handler_goes_to_another_instance(
    durable_url: str, name: Callable[[str], str], tmp_path: Path, processes: Apps
) -> None:
    out = tmp_path / "handled.txt"
    ordering = name("ordering")
    doomed = processes.start_app(durable_url, ordering, str(out), "--hang")
    async with Bus(name("basket"), durable_url) as basket:
        basket.route(PlaceOrder, to=ordering)
        await basket.send(PlaceOrder(order_id=42))
    await eventually(lambda: ["started", "42"] in [line[2:] for line in lines(out)])
    doomed.kill()  # SIGKILL: no chance to give the message back
    doomed.wait()

    processes.start_app(durable_url, ordering, str(out))
    await eventually(lambda: ["command", "42"] in [line[2:] for line in lines(out)], timeout=30)
    survivors = [line for line in lines(out) if line[2] == "command"]
    assert len(survivors) == 1
    assert survivors[0][1] != str(doomed.pid)


PUBLISHER = """
import asyncio, sys
from tidings import Bus
from tests.conformance.test_semantics import PlaceOrder

async def main():
    async with Bus(sys.argv[2] + "-sender", sys.argv[1]) as bus:
        bus.route(PlaceOrder, to=sys.argv[2])
        order_id = 0
        while True:
            await bus.send(PlaceOrder(order_id=order_id))
            print(order_id, flush=True)  # printed only after the transport confirmed
            order_id += 1

asyncio.run(main())
"""


async def test_a_confirmed_send_survives_kill_9_of_the_sender(
    durable_url: str, name: Callable[[str], str], tmp_path: Path
) -> None:
    ordering = Bus(name("ordering"), durable_url)
    received: list[int] = []

    @ordering.handle(PlaceOrder)
    async def place(command: PlaceOrder, ctx: object) -> None:
        received.append(command.order_id)

    await ordering.start()  # declare the queue before the sender sends to it
    sender = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, durable_url, ordering.service],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sender.stdout is not None
    confirmed: list[int] = []
    try:
        while len(confirmed) < 300:
            line = await asyncio.to_thread(sender.stdout.readline)
            assert line, f"sender died early (exit code {sender.poll()})"
            confirmed.append(int(line))
    finally:
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait()
    confirmed.extend(int(line) for line in sender.stdout.read().split())
    sender.stdout.close()

    run = asyncio.create_task(ordering.run())
    try:
        await eventually(lambda: set(confirmed) <= set(received), timeout=30)
    finally:
        ordering.stop()
        await run
        await ordering.close()
