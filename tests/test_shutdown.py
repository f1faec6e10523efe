"""Stopping a bus never runs a finished handler again, never waits without limit, leaves no task behind.

- `close()` while `run()` goes on in another task (a web app's lifespan) once closed the transport
  under a running handler: its ack was lost and the next instance handled the message again.
- A hung handler held a stopping bus forever; now `shutdown_grace`, or a second `stop()`, ends it.
- `run()` ending with the consumer's error left the relay and the inbox clean-up running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TRANSPORTS, rabbitmq_system_url, system_url
from tests.helpers import eventually
from tests.storage.databases import sqlite_engine
from tidings import Bus, Command, Context, TransportError


class Work(Command):
    n: int


@pytest.fixture(params=TRANSPORTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return system_url(request.param, tmp_path)


def worker(url: str, service: str, handled: list[tuple[str, int]], tag: str, *, hang: bool = False,
           started: asyncio.Event | None = None, **options: float) -> Bus:  # fmt: skip
    bus = Bus(service, url, **options)  # type: ignore[arg-type]

    @bus.handle(Work)
    async def work(command: Work, ctx: Context) -> None:
        if started is not None:
            started.set()
        await asyncio.sleep(0.5)
        if hang:
            await asyncio.Event().wait()
        handled.append((tag, command.n))

    return bus


async def test_close_during_run_lets_the_running_handler_finish_and_settle(
    url: str, name: Callable[[str], str]
) -> None:
    service = name("shutdown")
    handled: list[tuple[str, int]] = []
    started = asyncio.Event()
    first = worker(url, service, handled, "first", started=started)
    await first.start()
    running = asyncio.create_task(first.run())
    await first.send(Work(n=1))
    await asyncio.wait_for(started.wait(), 15)
    await first.close()  # no stop() first, as a web app's lifespan does it
    await asyncio.wait_for(running, 15)
    assert handled == [("first", 1)]

    second = worker(url, service, handled, "second")
    async with second:
        consuming = asyncio.create_task(second.run())
        await asyncio.sleep(1.5)  # room for a wrongly redelivered copy to be handled
        second.stop()
        await consuming
    assert handled == [("first", 1)], "a handler that finished ran again after the shutdown"


async def test_a_hung_handler_is_cut_off_after_the_grace_and_its_message_released(
    url: str, name: Callable[[str], str]
) -> None:
    service = name("grace")
    handled: list[tuple[str, int]] = []
    started = asyncio.Event()
    stuck = worker(url, service, handled, "stuck", hang=True, started=started, shutdown_grace=0.3)
    await stuck.start()
    running = asyncio.create_task(stuck.run())
    await stuck.send(Work(n=1))
    await asyncio.wait_for(started.wait(), 15)
    await asyncio.wait_for(stuck.close(), 10)  # not forever
    await asyncio.wait_for(running, 5)

    rescuer = worker(url, service, handled, "rescuer")
    async with rescuer:
        consuming = asyncio.create_task(rescuer.run())
        await eventually(lambda: handled == [("rescuer", 1)])
        rescuer.stop()
        await consuming


async def test_a_second_stop_ends_the_shutdown_grace_at_once(url: str, name: Callable[[str], str]) -> None:
    service = name("hurry")
    handled: list[tuple[str, int]] = []
    started = asyncio.Event()
    stuck = worker(url, service, handled, "stuck", hang=True, started=started, shutdown_grace=300)
    await stuck.start()
    running = asyncio.create_task(stuck.run())
    await stuck.send(Work(n=1))
    await asyncio.wait_for(started.wait(), 15)
    stuck.stop()
    await asyncio.sleep(0.7)
    assert not running.done(), "the first stop must wait for the handler"
    stuck.stop()  # a second signal
    await asyncio.wait_for(running, 10)
    await stuck.close()

    rescuer = worker(url, service, handled, "rescuer")
    async with rescuer:
        consuming = asyncio.create_task(rescuer.run())
        await eventually(lambda: handled == [("rescuer", 1)])
        rescuer.stop()
        await consuming


def _storage_tasks() -> list[str]:
    names = ("Relay.run", "Inbox.clean_up_forever")
    return [
        task.get_coro().__qualname__  # type: ignore[union-attr]
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") in names
    ]


@pytest.mark.rabbitmq
async def test_run_that_ends_with_the_consumers_error_leaves_no_task_behind(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path / "service.db")
    bus = Bus("leaky", rabbitmq_system_url(), database=engine)

    @bus.handle(Work)
    async def work(command: Work, ctx: Context) -> None:
        pass

    await bus.create_tables()
    try:
        async with bus:
            running = asyncio.create_task(bus.run())
            await eventually(lambda: len(_storage_tasks()) == 2)
            channel = await bus.transport.connection().channel()  # type: ignore[attr-defined]
            await channel.queue_delete(bus.transport.topology.queue(bus.queue))  # type: ignore[attr-defined]
            await channel.close()
            with pytest.raises(TransportError):
                await asyncio.wait_for(running, 30)
            assert _storage_tasks() == []
    finally:
        await engine.dispose()
