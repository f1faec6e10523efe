"""Poison (the issue's point 4): a message on which the consumer dies every time reaches the error
queue after at most the delivery limit, and the other messages keep flowing.

On SQLite and RabbitMQ the consumer is a real OS process that `os._exit`s, restarted in a loop by
the test: the message comes back through the visibility timeout (SQLite) or the broker's
redelivery with `x-delivery-count` (RabbitMQ quorum queue). On memory, which lives in one process,
the death is simulated: the handler's task ends without settling and the bus is closed.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.helpers import Processes, eventually, running
from tests.recoverability.app import Job
from tests.recoverability.poison_worker import MAX_DELIVERIES, POISON, POISON_EXIT
from tidings import Bus, Context, DeadLetters, RetryPolicy

GOOD = 20


class Workers(Processes):
    """Poison workers (`tests.recoverability.poison_worker`), none outliving the test."""

    def start_worker(self, url: str, service: str, out: Path, *options: str) -> subprocess.Popen[str]:
        return self.start("tests.recoverability.poison_worker", url, service, str(out), *options)


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.stop_all()


def lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def good_ones(out: Path) -> set[int]:
    return {int(line.split()[1]) for line in lines(out) if line.startswith("good ")}


@pytest.mark.slow
async def test_a_message_that_kills_its_consumer_process_is_dead_lettered_at_the_limit(
    durable_url: str, service: str, tmp_path: Path, workers: Workers
) -> None:
    out = tmp_path / "handled.txt"
    async with Bus(service, durable_url) as producer:  # declares the service's queue
        poison = producer.sender.envelope_for(Job(n=0, note=POISON))
        await producer.transport.send(poison, service)
        for n in range(1, GOOD + 1):
            await producer.send(Job(n=n), to=service)
        dead_letters = DeadLetters(producer.transport, service)

        async def poison_dead_lettered() -> bool:
            return await dead_letters.get(poison.id) is not None

        deaths = 0
        worker = workers.start_worker(durable_url, service, out)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90  # a bound on waiting, so a broken transport fails, not hangs
        while not (good_ones(out) == set(range(1, GOOD + 1)) and await poison_dead_lettered()):
            assert loop.time() < deadline, f"not settled after {deaths} deaths: {lines(out)}"
            if worker.poll() is not None:
                assert worker.returncode == POISON_EXIT, "the worker failed for another reason"
                assert worker.stdout is not None
                worker.stdout.close()
                deaths += 1
                assert deaths <= MAX_DELIVERIES, "the poison message outlived the delivery limit"
                worker = workers.start_worker(durable_url, service, out)
            await asyncio.sleep(0.05)

        # The consumer that dead-lettered it is alive and still taking messages.
        assert worker.poll() is None
        await producer.send(Job(n=GOOD + 1), to=service)
        await eventually(lambda: GOOD + 1 in good_ones(out), timeout=30)
        failed = await dead_letters.get(poison.id)

    calls_on_poison = sum(1 for line in lines(out) if line.startswith(POISON))
    assert 1 <= deaths == calls_on_poison <= MAX_DELIVERIES
    assert failed is not None
    assert failed.fault.reason == "delivery-limit"
    assert failed.fault.attempts == 0  # the delivery that dead-lettered it called no handler
    assert failed.body == poison.body
    assert good_ones(out) == set(range(1, GOOD + 2))


NEIGHBOURS = 100


@pytest.mark.slow
async def test_a_poison_message_does_not_take_its_prefetched_neighbours_with_it(
    durable_url: str, service: str, tmp_path: Path, workers: Workers
) -> None:
    # The bus's default concurrency (10) and prefetch (40): each death of a worker leaves the
    # poison message unsettled together with the neighbours it had in flight and prefetched. Only
    # the poison message may reach the delivery limit; every neighbour is handled.
    out = tmp_path / "handled.txt"
    async with Bus(service, durable_url) as producer:
        poison = producer.sender.envelope_for(Job(n=0, note=POISON))
        for n in range(1, NEIGHBOURS + 1):
            if n == 4:
                await producer.transport.send(poison, service)
            await producer.send(Job(n=n), to=service)
        dead_letters = DeadLetters(producer.transport, service)

        deaths = 0
        worker = workers.start_worker(durable_url, service, out, "--defaults")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 100
        while not (len(good_ones(out)) == NEIGHBOURS and await dead_letters.get(poison.id) is not None):
            assert loop.time() < deadline, f"not settled after {deaths} deaths: {len(good_ones(out))} good"
            if worker.poll() is not None:
                assert worker.returncode == POISON_EXIT, "the worker failed for another reason"
                assert worker.stdout is not None
                worker.stdout.close()
                deaths += 1
                assert deaths <= MAX_DELIVERIES, "the poison message outlived the delivery limit"
                worker = workers.start_worker(durable_url, service, out, "--defaults")
            await asyncio.sleep(0.05)
        failed = await dead_letters.list()

    assert deaths == MAX_DELIVERIES
    assert [(letter.id, letter.fault.reason) for letter in failed] == [(poison.id, "delivery-limit")]
    assert good_ones(out) == set(range(1, NEIGHBOURS + 1))


class SimulatedDeath(BaseException):
    """What `os._exit` is to a handler: no `except Exception` stops it, nothing gets settled."""


async def test_a_message_that_kills_its_consumer_is_dead_lettered_at_the_limit_on_memory(
    service: str,
) -> None:
    url = f"memory://{unique('rec')}"
    deaths = 0
    handled: set[int] = set()
    poison_id = ""
    for life in range(MAX_DELIVERIES + 1):
        bus = Bus(
            service, url, concurrency=1, prefetch=1, max_deliveries=MAX_DELIVERIES, retry=RetryPolicy.none()
        )
        died = asyncio.Event()

        @bus.handle(Job)
        async def handle(job: Job, ctx: Context, died: asyncio.Event = died) -> None:
            nonlocal deaths
            if job.note == POISON:
                deaths += 1
                died.set()
                raise SimulatedDeath()
            handled.add(job.n)

        async with running(bus):
            if life == 0:
                poison = bus.sender.envelope_for(Job(n=0, note=POISON))
                poison_id = poison.id
                await bus.transport.send(poison, service)
                for n in range(1, GOOD + 1):
                    await bus.send(Job(n=n))
            # This life ends when the message killed it, or when it was dead-lettered.
            stats = bus.stats
            await eventually(lambda: died.is_set() or stats.dead_lettered == 1)  # noqa: B023
            if stats.dead_lettered:
                await eventually(lambda: len(handled) == GOOD)  # the others flow again
                [failed] = await DeadLetters(bus.transport, service).list()
                break
        # Closing the bus gave the unsettled message back, as a dead process's connection would.
    else:
        pytest.fail(f"the poison message was still not dead-lettered after {deaths} deaths")

    assert deaths == MAX_DELIVERIES
    assert (failed.id, failed.fault.reason) == (poison_id, "delivery-limit")
    assert handled == set(range(1, GOOD + 1))
