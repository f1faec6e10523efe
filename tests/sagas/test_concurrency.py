"""Two messages of one saga at once: no lost update (the version column), one instance for two
starts (the primary key), and a conflict is a step run again, not a failure.

On PostgreSQL both transactions really run side by side: a gate holds each message's first try
until both have read the saga, so both write on the same version and one must lose. On SQLite the
inbox takes the write lock first and the steps queue (the gate gives up after a moment): no
conflict can arise there, and the same assertions hold.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.sagas.sagas import Step, Tally
from tidings import Bus, Saga, SagaContext, starts
from tidings.sagas.store import sagas_table


class Gate:
    """Lets callers through once `parties` have arrived (or after `patience` seconds)."""

    def __init__(self, parties: int, patience: float) -> None:
        self.parties = parties
        self.patience = patience
        self.arrived = 0
        self._open = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self._open.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._open.wait(), self.patience)


gate = Gate(2, 0.0)


class Racing(Saga[Tally], name="racing"):
    @starts(Step, by="key")
    async def step(self, message: Step, ctx: SagaContext) -> None:
        if message.n > 0:
            await gate.wait()  # both messages have read the saga before either writes
        self.state.steps.append(message.n)


async def stored(database: AsyncEngine, key: str) -> tuple[list[int], int]:
    """The steps in the saga's state and its version."""
    async with database.connect() as connection:
        row = (
            await connection.execute(
                select(sagas_table.c.state, sagas_table.c.version).where(sagas_table.c.key == key)
            )
        ).one()
    return sorted(Tally.model_validate_json(row.state).steps), row.version


def racing_bus(database: AsyncEngine) -> Bus:
    global gate
    gate = Gate(2, 3.0 if database.dialect.name == "postgresql" else 0.2)
    bus = Bus("racing", f"memory://{unique()}", database=database, concurrency=4)
    bus.saga(Racing)
    return bus


async def test_two_steps_of_one_saga_at_once_lose_no_update(database: AsyncEngine) -> None:
    bus = racing_bus(database)
    await bus.create_tables()
    assert bus.sagas is not None
    stats = bus.sagas.stats
    async with running(bus):
        await bus.send(Step(key="k", n=0))
        await eventually(lambda: stats.started == 1)
        await bus.send(Step(key="k", n=1))
        await bus.send(Step(key="k", n=2))
        await eventually(lambda: stats.steps == 3, timeout=30)
    assert await stored(database, "k") == ([0, 1, 2], 3)
    assert bus.stats.failed_attempts == 0
    assert bus.stats.dead_lettered == 0
    if database.dialect.name == "postgresql":
        assert stats.conflicts >= 1  # the race did happen, and was won by a retry


async def test_two_starts_for_one_key_make_one_instance(database: AsyncEngine) -> None:
    bus = racing_bus(database)
    await bus.create_tables()
    assert bus.sagas is not None
    stats = bus.sagas.stats
    async with running(bus):
        await bus.send(Step(key="s", n=1))
        await bus.send(Step(key="s", n=2))
        await eventually(lambda: stats.steps == 2, timeout=30)
    assert await stored(database, "s") == ([1, 2], 2)
    assert stats.started == 1
    assert bus.stats.failed_attempts == 0
    if database.dialect.name == "postgresql":
        assert stats.conflicts >= 1


@pytest.mark.postgres
async def test_a_step_that_keeps_losing_goes_back_for_later_without_counting_a_failure(
    postgres: AsyncEngine,
) -> None:
    from tidings import SagaSettings

    global gate
    gate = Gate(2, 3.0)
    bus = Bus(
        "racing",
        f"memory://{unique()}",
        database=postgres,
        concurrency=4,
        saga_settings=SagaSettings(max_conflict_retries=0, conflict_delay=0.05),
    )
    bus.saga(Racing)
    await bus.create_tables()
    assert bus.sagas is not None
    stats = bus.sagas.stats
    async with running(bus):
        await bus.send(Step(key="d", n=0))
        await eventually(lambda: stats.started == 1)
        await bus.send(Step(key="d", n=1))
        await bus.send(Step(key="d", n=2))
        await eventually(lambda: stats.steps == 3, timeout=30)
    assert await stored(postgres, "d") == ([0, 1, 2], 3)
    assert stats.conflicts_deferred >= 1
    assert bus.stats.retries_scheduled >= 1
    assert bus.stats.failed_attempts == 0
