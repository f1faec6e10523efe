"""Crash tests: real processes killed with SIGKILL at the dangerous points; nothing lost, no effect twice.

Each runs on a SQLite and a PostgreSQL database, with the SQLite transport (and RabbitMQ). The
processes are `tests/storage/app.py` (producer, writers) and the real CLI (`tidings relay`,
`tidings run`); `TIDINGS_CRASH_AT` (tidings.storage.crashpoints) kills one at an exact point.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import rabbitmq_system_url
from tests.sizes import size
from tests.storage.databases import produced
from tests.storage.messages import Credit
from tests.storage.processes import KILLED, Cluster, Process, exited, until
from tidings import Bus
from tidings.storage import outbox_table

TRANSPORTS = ["sqlite", pytest.param("rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.slow])]


@pytest.fixture(params=TRANSPORTS)
def transport_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/bus.db?visibility_timeout=1"
    return rabbitmq_system_url("crash")


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str, transport_url: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, database_url, transport_url)
    await cluster.declare_queues("bank", "ledger")
    try:
        yield cluster
    finally:
        await cluster.stop()


async def test_a_producer_killed_after_its_commit_before_the_relay_ran(cluster: Cluster) -> None:
    producer = await cluster.produce(1, "--with-relay", crash_at="outbox-after-commit")
    assert await exited(producer) == KILLED
    assert await cluster.produced_count() == 1
    assert await cluster.unsent() == 1  # committed, never shipped: the relay never woke

    await cluster.relay()
    await cluster.consumer()
    await until(lambda: _effects_total(cluster, 1), what="the message's effect")
    lost, twice = await cluster.ledger()
    assert (lost, twice) == ([], [])


async def test_b_relay_killed_after_the_broker_confirmed_before_marking(cluster: Cluster) -> None:
    producer = await cluster.produce(5, "--per-transaction", "5")
    assert await exited(producer) == 0
    relay = await cluster.relay(crash_at="relay-after-confirm")
    assert await exited(relay) == KILLED
    assert await cluster.unsent() == 5  # on the wire, not marked: shipped again after the lease

    await cluster.consumer()
    await cluster.relay()

    async def every_copy_handled() -> bool:
        return sum(cluster.delivery_log().values()) == 10 and await cluster.unsent() == 0

    await until(every_copy_handled, what="both copies of the five messages handled")
    assert set(cluster.delivery_log().values()) == {2}  # each message was on the wire twice
    assert await cluster.effects_by_seq() == {seq: 1 for seq in range(1, 6)}  # its effect once


async def test_c_consumer_killed_after_its_commit_before_the_ack(cluster: Cluster) -> None:
    producer = await cluster.produce(1, "--with-relay")
    assert await exited(producer) == 0
    consumer = await cluster.consumer(crash_at="inbox-after-commit")
    assert await exited(consumer) == KILLED
    assert await cluster.effects_by_seq() == {1: 1}  # committed before the kill

    await cluster.consumer()  # the unacknowledged message comes back after the visibility timeout

    async def redelivered() -> bool:
        return sum(cluster.delivery_log().values()) == 1  # `done` of the duplicate (the first died)

    await until(redelivered, what="the redelivered copy handled")
    assert await cluster.effects_by_seq() == {1: 1}


async def _effects_total(cluster: Cluster, expected: int) -> bool:
    return sum((await cluster.effects_by_seq()).values()) >= expected


# SQLite has one writer: a transaction gets its ids and commits before the next starts, so the
# out-of-order case cannot arise there; the eight-writers test below covers SQLite.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_d_writers_committing_out_of_id_order_lose_no_row(cluster: Cluster) -> None:
    """Eight transactions take ids 1..8, then commit 8 first, 1 last; the relay ships each at once.

    A relay that remembers "the last id I saw" and asks for `id > last` has seen 8 before 1..7
    were visible, and never ships them: this test then times out waiting for their effects.
    The writers are eight connections of this process; relay and consumer are real processes.
    """
    await cluster.relay()
    await cluster.consumer()
    bank = Bus("bank", transport=cluster.transport_url, database=cluster.engine)
    bank.route(Credit, to="ledger")
    async with contextlib.AsyncExitStack() as stack:
        transactions = []
        for seq in range(1, 9):  # one after the other: transaction k holds id k, uncommitted
            session = await stack.enter_async_context(AsyncSession(cluster.engine))
            transactions.append(await session.begin())
            await session.execute(insert(produced).values(seq=seq))
            await bank.send(Credit(account="d", seq=seq), session=session)
        for transaction in reversed(transactions):
            await transaction.commit()
            await until(lambda: _all_sent(cluster), what="the row just committed shipped")
    assert await _ids_in_shipping_order(cluster) == list(range(8, 0, -1))  # the case did arise
    await until(lambda: _effects_total(cluster, 8), what="all eight effects")
    assert await cluster.effects_by_seq() == {seq: 1 for seq in range(1, 9)}


async def test_d_eight_concurrent_writers_lose_no_row(cluster: Cluster) -> None:
    await cluster.relay()
    await cluster.consumer()
    writers = await cluster.start("tests.storage.app", "write", "8", "25")
    assert await exited(writers, timeout=60) == 0
    await until(lambda: _effects_total(cluster, 200), timeout=60, what="all 200 effects")
    assert await cluster.effects_by_seq() == {seq: 1 for seq in range(1, 201)}


#: (role, crash point) pairs a restarted process may get, so kills also land on the exact windows.
CRASH_POINTS = {
    "producer": "outbox-after-commit",
    "relay": "relay-after-confirm",
    "consumer-1": "inbox-after-commit",
    "consumer-2": "inbox-after-commit",
}


# Two of the four database x transport pairs, so that the suite keeps to its time: each database
# and each transport is in one of them (the other crash tests run all four pairs).
LEDGER_PAIRS = [
    ("sqlite", "sqlite"),
    pytest.param(
        "postgresql", "rabbitmq", marks=[pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]
    ),
]


@pytest.mark.slow
@pytest.mark.timeout(300)  # about a minute here; the loop below fails on its own after 150 s
@pytest.mark.parametrize(("database_url", "transport_url"), LEDGER_PAIRS, indirect=True)
async def test_e_ledger_with_kills_at_random_points(cluster: Cluster) -> None:
    count = size(4_000, 10_000)  # 10,000 with scripts/test --full
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")

    async def start(role: str, crash_at: str | None = None) -> Process:
        if role == "producer":
            return await cluster.produce(count, "--per-transaction", "50", "--with-relay", crash_at=crash_at)
        if role == "relay":
            return await cluster.relay(crash_at=crash_at)
        return await cluster.consumer(crash_at=crash_at)

    # SQLite has one writer: a second consumer process would only wait on the first's lock.
    roles = [role for role in CRASH_POINTS if role != "consumer-2" or "postgresql" in cluster.database_url]
    processes = {role: await start(role) for role in roles}
    # Deaths cost a restart (a second of imports) and a visibility timeout each: a budget keeps
    # the test within its time while every kind of death still happens several times.
    deaths = {"kill": 0, "crash point": 0}
    budget = {"kill": 8, "crash point": 6}

    async def finished() -> bool:
        return (
            await cluster.distinct_effects() == count
            and await cluster.produced_count() == count
            and await cluster.unsent() == 0
        )

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 150
    while not await finished():
        assert loop.time() < deadline, f"ledger incomplete after 150 s (seed {seed}, deaths {deaths})"
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        for role, process in processes.items():
            if process.returncode is not None and not (role == "producer" and process.returncode == 0):
                # Dead (killed, or its crash point fired): back up, maybe with a crash point armed.
                point = None
                if deaths["crash point"] < budget["crash point"] and rng.random() < 0.5:
                    point = f"{CRASH_POINTS[role]}:{rng.randint(1, 200)}"
                    deaths["crash point"] += 1
                processes[role] = await start(role, crash_at=point)
        if deaths["kill"] < budget["kill"]:
            victim = processes[rng.choice(list(processes))]
            if victim.returncode is None:
                victim.kill()
                deaths["kill"] += 1
    lost, twice = await cluster.ledger()
    assert lost == [], f"seed {seed}"
    assert twice == [], f"seed {seed}"
    assert deaths["kill"] > 0


async def _all_sent(cluster: Cluster) -> bool:
    return await cluster.unsent() == 0


async def _ids_in_shipping_order(cluster: Cluster) -> list[int]:
    async with cluster.engine.connect() as connection:
        query = select(outbox_table.c.id).order_by(outbox_table.c.sent_at, outbox_table.c.id)
        return list((await connection.execute(query)).scalars())
