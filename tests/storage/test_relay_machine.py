"""A state machine over the relay: writers, two relays, crashes, refusals, outages, time passing.

Whatever happens, a message rolled back is never shipped, messages of one transaction or subject
are first shipped in id order (unless one was refused: a refused row holds nobody up), a message
is shipped twice only when a relay died after shipping it, and once the dust settles every
committed message has been shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from tests.storage.databases import sqlite_engine
from tests.storage.messages import Deposited
from tidings import Bus, Envelope, NoRoute, TransportError
from tidings.outbox import OutboxSettings
from tidings.outbox_order import plan
from tidings.relay import Relay, _Round
from tidings.storage import metadata, outbox_table
from tidings.transports.memory import MemoryTransport


@dataclass
class Broker:
    """What the scripted transports share: the outage switch, the refused subject, the wire."""

    down: bool = False
    refused_subject: str | None = None
    shipped: list[str] = field(default_factory=list)
    #: Ids refused at least once (a refused row holds nobody up, whether or not it was recorded).
    refused: set[str] = field(default_factory=set)


class ScriptedTransport(MemoryTransport):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self.script = broker

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        await asyncio.sleep(0)  # a broker round trip: the other relay may go on meanwhile
        if self.script.down:
            raise TransportError("broker down")
        if envelope.subject is not None and envelope.subject == self.script.refused_subject:
            self.script.refused.add(envelope.id)
            raise NoRoute(f"subject {envelope.subject} refused")
        self.script.shipped.append(envelope.id)


@dataclass(frozen=True)
class Written:
    message_id: str
    transaction: int
    subject: str | None


class RelayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="relay-machine-"))
        self.engine = sqlite_engine(self.directory / "outbox.db")
        self.broker = Broker()
        settings_ = OutboxSettings(batch_size=3, max_in_flight=2, claim_timeout=3600)
        self.buses = [
            Bus(
                "producer",
                transport=ScriptedTransport(self.broker),
                database=self.engine,
                outbox_settings=settings_,
            )
            for _ in range(2)
        ]
        self.written: list[Written] = []  # committed, in id order
        self.rolled_back: set[str] = set()
        self.shipped_by_the_dead: set[str] = set()
        self.transactions = 0
        self.run(self._open())

    def run(self, coroutine: object) -> object:
        return self.loop.run_until_complete(coroutine)  # type: ignore[arg-type]

    async def _open(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        for bus in self.buses:
            await bus.start()

    def relay(self, index: int) -> Relay:
        return self.buses[index].relay  # type: ignore[union-attr]

    # -- what happens --------------------------------------------------------------------------

    @rule(subjects=st.lists(st.sampled_from([None, "a", "b"]), min_size=1, max_size=4), commit=st.booleans())
    def write(self, subjects: list[str | None], commit: bool) -> None:
        self.transactions += 1

        bus = self.buses[0]

        async def write() -> list[Written]:
            rows = []
            async with AsyncSession(self.engine) as session, session.begin():
                for subject in subjects:
                    envelope = bus.sender.envelope_for(Deposited(account="x", seq=0), subject=subject)
                    await bus.sender.dispatch(envelope, queue=None, session=session)
                    rows.append(Written(envelope.id, self.transactions, subject))
                if not commit:
                    await session.rollback()
            return rows

        rows: list[Written] = self.run(write())  # type: ignore[assignment]
        if commit:
            self.written.extend(rows)
        else:
            self.rolled_back.update(row.message_id for row in rows)

    @rule(index=st.integers(0, 1))
    def round(self, index: int) -> None:
        self.run(self._round(index))

    @rule()
    def both_relays_at_once(self) -> None:
        async def both() -> None:
            await asyncio.gather(self._round(0), self._round(1))

        self.run(both())

    async def _round(self, index: int) -> None:
        with contextlib.suppress(TransportError):
            await self.relay(index).relay_once()

    @rule(index=st.integers(0, 1))
    def relay_dies_after_shipping(self, index: int) -> None:
        """Claim, ship, and die before settling: the rows stay leased to a relay that is gone."""
        relay = self.relay(index)

        async def die() -> None:
            claimed, elsewhere = await relay._claim()
            chains, _held = plan(claimed, elsewhere)
            result = _Round()
            before = len(self.broker.shipped)
            await relay._ship(chains, result)
            self.shipped_by_the_dead.update(self.broker.shipped[before:])

        self.run(die())
        # Its successor has a new identity: the old leases belong to nobody alive.
        relay.relay_id = uuid.uuid4().hex

    @rule(index=st.integers(0, 1))
    def relay_dies_after_claiming(self, index: int) -> None:
        """Claim and die before shipping: the rows wait, leased, and their chains wait with them."""
        relay = self.relay(index)
        self.run(relay._claim())
        relay.relay_id = uuid.uuid4().hex

    @rule(down=st.booleans())
    def broker_outage(self, down: bool) -> None:
        self.broker.down = down

    @rule(subject=st.sampled_from([None, "b"]))
    def broker_refuses(self, subject: str | None) -> None:
        self.broker.refused_subject = subject

    @rule()
    def time_passes(self) -> None:
        """Leases of dead relays run out, refused rows come due."""
        past = datetime.now(UTC) - timedelta(seconds=1)

        async def later() -> None:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(outbox_table)
                    .where(outbox_table.c.sent_at.is_(None))
                    .values(claimed_until=past, next_attempt_at=past)
                )

        self.run(later())

    # -- what must hold ------------------------------------------------------------------------

    @invariant()
    def nothing_rolled_back_is_shipped(self) -> None:
        assert not self.rolled_back & set(self.broker.shipped)

    @invariant()
    def first_shipments_keep_the_order(self) -> None:
        first: dict[str, int] = {}
        for position, message_id in enumerate(self.broker.shipped):
            first.setdefault(message_id, position)
        for later_index, later in enumerate(self.written):
            if later.message_id not in first:
                continue
            for earlier in self.written[:later_index]:
                related = earlier.transaction == later.transaction or (
                    earlier.subject is not None and earlier.subject == later.subject
                )
                if related and earlier.message_id not in self.broker.refused:
                    assert earlier.message_id in first, (earlier, later)
                    assert first[earlier.message_id] < first[later.message_id], (earlier, later)

    @invariant()
    def only_the_dead_ship_twice(self) -> None:
        seen: set[str] = set()
        for message_id in self.broker.shipped:
            if message_id in seen:
                assert message_id in self.shipped_by_the_dead, message_id
            seen.add(message_id)

    def teardown(self) -> None:
        try:
            self.broker.down = False
            self.broker.refused_subject = None
            self.time_passes()
            for _ in range(len(self.written) + 2):
                self.round(0)
            assert {row.message_id for row in self.written} <= set(self.broker.shipped)
        finally:
            self.run(self._close())
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _close(self) -> None:
        for bus in self.buses:
            await bus.close()
        await self.engine.dispose()


RelayMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_relay_state_machine = RelayMachine.TestCase
