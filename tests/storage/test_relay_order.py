"""The relay's ordering: one transaction's messages, and one subject's, go out in id order.

`plan` is checked as a property over arbitrary batches; two relays claiming side by side are
checked against the real tables.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.storage.messages import Deposited
from tidings import Bus, Envelope
from tidings.outbox import OutboxSettings
from tidings.outbox_order import OutboxRow, plan
from tidings.storage import outbox_table

rows = st.lists(
    st.builds(
        OutboxRow,
        id=st.integers(1, 60),
        transaction_key=st.integers(1, 6),
        subject=st.one_of(st.none(), st.sampled_from("abcd")),
    ),
    unique_by=lambda row: row.id,
    max_size=40,
)


def shares_a_key(one: OutboxRow, other: OutboxRow) -> bool:
    return bool(set(one.order_keys()) & set(other.order_keys()))


@given(rows=rows, split=st.integers(0, 40), data=st.data())
def test_plan_ships_a_row_only_after_every_older_row_it_must_follow(
    rows: list[OutboxRow], split: int, data: st.DataObject
) -> None:
    """A shipped row's older relatives are in its own chain, before it; none is held or elsewhere."""
    ordered = sorted(rows, key=lambda row: row.id)
    claimed = ordered[split:]
    # Of the older rows, some are with another relay (the rest were sent already).
    elsewhere = [row for row in ordered[:split] if data.draw(st.booleans())]
    chains, held = plan(claimed, elsewhere)

    shipped = [row for chain in chains for row in chain]
    assert sorted(row.id for row in shipped + held) == [row.id for row in claimed]
    chain_of = {row.id: index for index, chain in enumerate(chains) for row in chain}
    for chain in chains:
        assert [row.id for row in chain] == sorted(row.id for row in chain)
    held_ids = {row.id for row in held}
    for row in shipped:
        for older in claimed + elsewhere:
            if older.id < row.id and shares_a_key(older, row):
                assert older.id not in held_ids
                assert chain_of.get(older.id) == chain_of[row.id]  # so sent before it


@given(rows=rows)
def test_plan_holds_nothing_back_when_no_other_relay_has_rows(rows: list[OutboxRow]) -> None:
    chains, held = plan(rows, [])
    assert held == []
    # Unrelated rows go in separate chains (side by side); related ones share a chain.
    for one in rows:
        for other in rows:
            if shares_a_key(one, other):
                assert any(one in chain and other in chain for chain in chains)


async def test_two_relays_side_by_side_keep_the_order_and_send_each_row_once(database: AsyncEngine) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    settings = OutboxSettings(batch_size=3)
    relays = [Bus("producer", transport=url, database=database, outbox_settings=settings) for _ in range(2)]
    shipped: list[str] = []
    for bus in relays:
        original = bus.transport.publish

        async def record(
            envelope: Envelope, *, not_before: object = None, _original: object = original
        ) -> None:
            await asyncio.sleep(0)  # let the other relay interleave
            shipped.append(envelope.id)
            await _original(envelope, not_before=not_before)  # type: ignore[operator]

        bus.transport.publish = record  # type: ignore[method-assign]
    writer = relays[0]
    for transaction in range(10):
        async with AsyncSession(database) as session, session.begin():
            for position in range(3):
                subject = "abc"[(transaction + position) % 3] if position != 1 else None
                await writer.publish(
                    Deposited(account="x", seq=transaction * 3 + position), session=session, subject=subject
                )
    async with relays[0], relays[1]:
        while len(shipped) < 30:
            await asyncio.gather(*(bus.relay.relay_once() for bus in relays))  # type: ignore[union-attr]

    async with database.connect() as connection:
        written = (await connection.execute(select(outbox_table).order_by(outbox_table.c.id))).all()
    assert sorted(shipped) == sorted(row.message_id for row in written)  # each once
    position = {message_id: index for index, message_id in enumerate(shipped)}
    groups: dict[object, list[int]] = defaultdict(list)
    for row in written:
        groups["transaction", row.transaction_key].append(position[row.message_id])
        if json.loads(row.headers).get("subject") is not None:
            groups["subject", row.subject].append(position[row.message_id])
    for key, positions in groups.items():
        assert positions == sorted(positions), key
    stats = [bus.relay.stats for bus in relays]  # type: ignore[union-attr]
    assert sum(stat.sent for stat in stats) == 30
    assert all(stat.sent > 0 for stat in stats)  # both shipped: they did work side by side
    # Whether a row had to wait for the other relay depends on how the two rounds interleave, so
    # it is not asserted here (it failed about 1 run in 20): the next test holds a row back for sure.


async def test_a_row_waits_while_an_older_row_of_its_subject_is_leased_by_a_dead_relay(
    database: AsyncEngine,
) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    dead, alive = (Bus("producer", transport=url, database=database) for _ in range(2))
    shipped: list[int] = []

    async def record(envelope: Envelope, *, not_before: object = None) -> None:
        shipped.append(json.loads(envelope.body)["seq"])

    alive.transport.publish = record  # type: ignore[method-assign]
    for seq in (1, 2):
        async with AsyncSession(database) as session, session.begin():
            await alive.publish(Deposited(account="x", seq=seq), session=session, subject="x")
        if seq == 1:
            await dead.relay._claim()  # type: ignore[union-attr]  # claims seq 1, then dies
    relay = alive.relay  # type: ignore[union-attr]
    async with alive:
        assert await relay.relay_once() == 0
        assert relay.stats.held_back == 1
        async with database.begin() as connection:  # the dead relay's lease runs out
            await connection.execute(update(outbox_table).values(claimed_until=None))
        assert await relay.relay_once() == 2
    assert shipped == [1, 2]
