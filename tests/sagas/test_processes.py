"""Sagas across real processes: four consumers of one saga service, duplicated and reordered
messages, kill -9 in the middle of steps, and a timeout that fires after a restart.

Two systems: a SQLite database with the SQLite transport, and PostgreSQL with RabbitMQ. Sizes
come from `tests/sizes.py`: smoke sizes by default, the issue's (1,000 sagas x 5 messages) under
`scripts/test --full`. The kill -9 test sends the same duplicated and reordered steps to the same
four consumers as the first one, and kills two of them on the way: at smoke size it alone runs.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import system_url
from tests.sagas.app import SERVICE
from tests.sagas.conftest import database_url_for
from tests.sagas.sagas import STEPS, Begin, Step, Tally, effects
from tests.sizes import FULL, size
from tests.storage.processes import KILLED, Cluster, exited, until
from tidings.envelope import Envelope
from tidings.sagas.store import sagas_table
from tidings.sending import Routes, Sender
from tidings.transports import transport_from_url

SYSTEMS = [
    pytest.param(("sqlite", "sqlite"), id="sqlite-db+sqlite-transport"),
    pytest.param(("postgresql", "rabbitmq"), id="postgresql+rabbitmq", marks=[pytest.mark.postgres]),
]
SAGAS = size(60, 1000)
#: pytest's per-test limit (120 s by default) is short for the full sizes on a busy machine.
pytestmark = pytest.mark.timeout(size(120, 1200))
CONSUMERS = 4
DUPLICATED = 0.10
#: Each step of a saga swaps with the next one with this chance: it leaves about 20 % of the
#: messages out of their place (the test checks the fraction of the run).
SWAP = 0.14


@pytest.fixture(params=SYSTEMS)
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    database_kind, transport_kind = request.param
    transport_url = system_url(transport_kind, tmp_path, visibility_timeout=1)
    async for database_url in database_url_for(database_kind, tmp_path):
        cluster = Cluster(tmp_path, database_url, transport_url)
        await cluster.declare_queues(SERVICE)
        try:
            yield cluster
        finally:
            await cluster.stop()


async def consumer(cluster: Cluster) -> asyncio.subprocess.Process:
    return await cluster.start("tidings.cli", "run", "tests.sagas.app:bus", "--concurrency", "4")


def plan(sagas: int, seed: int) -> tuple[list[Envelope], int, int]:
    """The envelopes to send: `STEPS` steps per saga, about a fifth of the messages out of their
    place, a tenth sent twice (same id, as an at-least-once transport does). Also how many were
    out of place and how many duplicated."""
    rng = random.Random(seed)
    sender = Sender("driver", transport_from_url("memory://plan"), Routes("driver", ()))
    envelopes: list[Envelope] = []
    reordered = duplicated = 0
    for number in range(sagas):
        steps = list(range(1, STEPS + 1))
        for index in range(STEPS - 1):
            if rng.random() < SWAP:
                steps[index], steps[index + 1] = steps[index + 1], steps[index]
        reordered += sum(1 for index, n in enumerate(steps, 1) if index != n)
        for n in steps:
            envelope = sender.envelope_for(Step(key=f"s{number}", n=n))
            envelopes.append(envelope)
            if rng.random() < DUPLICATED:
                envelopes.append(envelope)
                duplicated += 1
    return envelopes, reordered, duplicated


async def send_all(cluster: Cluster, envelopes: list[Envelope]) -> None:
    async with transport_from_url(cluster.transport_url) as transport:
        for envelope in envelopes:
            await transport.send(envelope, SERVICE)


async def effect_count(cluster: Cluster) -> int:
    return await cluster.scalar(select(func.count()).select_from(effects))


async def completed_count(cluster: Cluster) -> int:
    query = select(func.count()).select_from(sagas_table).where(sagas_table.c.completed_at.is_not(None))
    return await cluster.scalar(query)


async def verdict(cluster: Cluster, sagas: int) -> dict[str, int]:
    """What the databases and the error queue say once every saga completed."""
    async with cluster.engine.connect() as connection:
        rows = (
            await connection.execute(select(sagas_table.c.key, sagas_table.c.state, sagas_table.c.version))
        ).all()
        done = Counter(
            (row.key, row.n) for row in await connection.execute(select(effects.c.key, effects.c.n))
        )
    steps = {row.key: sorted(Tally.model_validate_json(row.state).steps) for row in rows}
    effected: dict[str, set[int]] = {}
    for key, n in done:
        effected.setdefault(key, set()).add(n)
    async with transport_from_url(cluster.transport_url) as transport:
        dead = await transport.dead_letters(SERVICE, limit=1000)
    return {
        "sagas": len(rows),
        "complete": sum(1 for key in steps if steps[key] == list(range(1, STEPS + 1))),
        # A step whose effect committed but which the state does not show: an update lost.
        "lost_updates": sum(len(effected.get(key, set()) - set(steps.get(key, []))) for key in effected),
        "effects_twice": sum(1 for count in done.values() if count > 1),
        "versions_off": sum(1 for row in rows if row.version != STEPS),
        "dead_letters": len(dead),
    }


def expected(sagas: int) -> dict[str, int]:
    return {
        "sagas": sagas,
        "complete": sagas,
        "lost_updates": 0,
        "effects_twice": 0,
        "versions_off": 0,
        "dead_letters": 0,
    }


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="full size only: at smoke size the kill -9 test covers it (and more)")
async def test_four_consumers_take_duplicated_and_reordered_steps_and_every_saga_completes(
    cluster: Cluster,
) -> None:
    envelopes, reordered, duplicated = plan(SAGAS, seed=15)
    assert 0.15 < reordered / (SAGAS * STEPS) < 0.25
    assert 0.05 < duplicated / (SAGAS * STEPS) < 0.15
    for _ in range(CONSUMERS):
        await consumer(cluster)
    await send_all(cluster, envelopes)
    await until(lambda: _all_done(cluster, SAGAS), timeout=size(120, 600), what="every saga completes")
    assert await verdict(cluster, SAGAS) == expected(SAGAS)
    assert await effect_count(cluster) == SAGAS * STEPS


@pytest.mark.slow
async def test_a_consumer_killed_during_steps_loses_no_saga_and_repeats_no_effect(cluster: Cluster) -> None:
    envelopes, _, _ = plan(SAGAS, seed=16)
    consumers = [await consumer(cluster) for _ in range(CONSUMERS)]
    await send_all(cluster, envelopes)
    kills = 0
    for fraction in (0.25, 0.6):
        await until(
            lambda f=fraction: _progress(cluster, int(SAGAS * STEPS * f)),  # type: ignore[misc]
            timeout=size(120, 600),
            what=f"{fraction:.0%} of the steps",
        )
        victim = consumers.pop(0)
        victim.send_signal(signal.SIGKILL)
        assert await exited(victim) == KILLED
        kills += 1
        consumers.append(await consumer(cluster))
    await until(lambda: _all_done(cluster, SAGAS), timeout=size(120, 600), what="every saga completes")
    assert kills == 2
    assert await verdict(cluster, SAGAS) == expected(SAGAS)


async def test_a_timeout_scheduled_before_a_restart_fires_after_it(cluster: Cluster) -> None:
    keys = [f"t{number}" for number in range(3)]
    first = await consumer(cluster)
    async with transport_from_url(cluster.transport_url) as transport:
        sender = Sender("driver", transport, Routes("driver", ()))
        for key in keys:
            await sender.send(Begin(key=key, after=1.5), to=SERVICE)

    async def scheduled() -> bool:
        waiting = select(func.count()).select_from(sagas_table).where(sagas_table.c.status == "waiting")
        return await cluster.scalar(waiting) == len(keys) and await cluster.unsent() == 0

    # The sagas wait and their timeouts are with the transport (shipped from the outbox)...
    await until(scheduled, what="the sagas wait, their timeouts shipped")
    first.send_signal(signal.SIGKILL)  # ... when the service dies
    assert await exited(first) == KILLED
    await asyncio.sleep(2.0)  # the timeouts fall due while nothing runs
    await consumer(cluster)

    async def expired() -> bool:
        query = select(func.count()).select_from(sagas_table).where(sagas_table.c.status == "expired")
        return await cluster.scalar(query) == len(keys)

    await until(expired, what="the timeouts fired after the restart")
    async with cluster.engine.connect() as connection:
        fired = Counter((await connection.execute(select(effects.c.key).where(effects.c.n == -1))).scalars())
    assert fired == dict.fromkeys(keys, 1)


async def _progress(cluster: Cluster, steps: int) -> bool:
    return await effect_count(cluster) >= steps


async def _all_done(cluster: Cluster, sagas: int) -> bool:
    return await completed_count(cluster) == sagas
