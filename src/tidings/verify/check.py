"""The checker: reads a run's ledger and says what was lost, and what happened twice.

    sent 10000, confirmed 10000, handled 10000, lost 0, duplicate deliveries 12,
    duplicate effects 0, dead-lettered 0

- *sent*: messages a producer made and recorded before they left; *confirmed*: those the broker
  confirmed (plain sends) or whose transaction committed (outbox sends). A sent message that was
  never confirmed (its producer died first, or the publish failed and was not retried) may or may
  not arrive: it is neither lost nor required.
- *handled*: messages whose effect is in the ledger, counted once each.
- *lost*: confirmed messages with no effect that are not in the error queue either.
- *duplicate deliveries*: deliveries beyond the first of each message (the wire is at-least-once;
  these are expected after a crash or a cut connection).
- *duplicate effects*: effects beyond the first of each message (the inbox makes this 0).
- *dead-lettered*: messages in the consumer's error queue (the harness's handler never fails, so
  any is a message the bus gave up on).
- *orphans*: business rows without their outbox row (the outbox makes this 0).

Each fault recorded in the ledger gets its time to recover: from the fault's end until both sides
work again, the later of the first broker confirm of a message made after it (a plain send's, or
the relay's) and the first delivery to a consumer after it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from tidings.storage import as_utc, outbox_table
from tidings.verify.ledger import PLAIN, Ledger

__all__ = ["Recovery", "Report", "check"]


@dataclass(frozen=True, slots=True)
class Recovery:
    """One fault and how long after its end the system did a full round trip again."""

    fault: str
    started_at: float
    ended_at: float
    #: Seconds from the end of the fault until a confirm and a delivery came again; None: not both.
    seconds: float | None

    def describe(self) -> str:
        lasted = f"{self.fault} ({self.ended_at - self.started_at:.1f} s)"
        if self.seconds is None:
            return f"{lasted}: no confirm and delivery after it"
        return f"{lasted}: recovered after {self.seconds:.2f} s"


@dataclass(frozen=True, slots=True)
class Report:
    """What the ledger of a run says (see the module docstring)."""

    sent: int
    confirmed: int
    handled: int
    lost: int
    duplicate_deliveries: int
    duplicate_effects: int
    dead_lettered: int
    orphans: int = 0
    #: Outbox rows not shipped yet.
    unsent: int = 0
    #: Confirmed messages per second, from the first send to the last confirm.
    throughput: float = 0.0
    recoveries: tuple[Recovery, ...] = ()
    #: Some of the lost message ids, for a look in the logs.
    lost_ids: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing applied twice, nothing given up on, no business row without its message."""
        return (
            self.lost == 0 and self.duplicate_effects == 0 and self.dead_lettered == 0 and self.orphans == 0
        )

    def line(self) -> str:
        """The figures of the checker, on one line."""
        return (
            f"sent {self.sent}, confirmed {self.confirmed}, handled {self.handled}, lost {self.lost}, "
            f"duplicate deliveries {self.duplicate_deliveries}, duplicate effects {self.duplicate_effects}, "
            f"dead-lettered {self.dead_lettered}"
        )

    def verify_line(self) -> str:
        """The last line of `tidings verify` (docs/verify.md)."""
        return (
            f"verify: sent {self.sent}, handled {self.handled}, lost {self.lost}, "
            f"duplicate deliveries {self.duplicate_deliveries}, duplicate effects {self.duplicate_effects}, "
            f"dead-lettered {self.dead_lettered}"
        )

    def details(self) -> list[str]:
        """The rest: orphans, backlog, throughput, recoveries, some lost ids."""
        lines = [
            f"business rows without their outbox row {self.orphans}, outbox rows unsent {self.unsent}, "
            f"throughput {self.throughput:.0f} confirmed messages/s"
        ]
        lines += [recovery.describe() for recovery in self.recoveries]
        if self.lost_ids:
            lines.append(f"lost, among others: {', '.join(self.lost_ids)}")
        return lines


async def check(ledger: Ledger, *, service: str, dead_lettered: Collection[str] = ()) -> Report:
    """Count what `ledger` holds; `dead_lettered`: the message ids in the consumer's error queue.

    `service` is the producers' service, whose outbox rows the business rows go with.
    """
    async with ledger.engine.connect() as connection:
        return await _check(connection, ledger, service, set(dead_lettered))


async def _scalar(connection: AsyncConnection, query: object) -> int:
    return int((await connection.execute(query)).scalar_one() or 0)  # type: ignore[call-overload]


async def _back_after(
    connection: AsyncConnection, ledger: Ledger, service: str, ended: float
) -> float | None:
    """When both sides worked again after a fault that ended at `ended`: the later of the first
    broker confirm of a message made after it (a plain send's, or the relay's for an outbox row)
    and the first delivery after it. None when one of them never came."""
    t = ledger.tables
    sent, outbox = t.sent.c, outbox_table.c
    # Publishing: a message made after the fault confirmed (a confirm of one sent before it may
    # only have been waiting to be read, or marked, when the fault ended).
    plain = select(func.min(sent.confirmed_at)).where(
        sent.mode == PLAIN, sent.created_at > ended, sent.confirmed_at > ended
    )
    first_plain = (await connection.execute(plain)).scalar_one()
    after = datetime.fromtimestamp(ended, UTC)
    relayed = select(func.min(outbox.sent_at)).where(
        outbox.service == service,
        outbox.message_id == sent.message_id,
        sent.created_at > ended,
        outbox.sent_at > after,
    )
    first_relayed = as_utc((await connection.execute(relayed)).scalar_one())
    confirms = [float(first_plain)] if first_plain is not None else []
    if first_relayed is not None:
        confirms.append(first_relayed.timestamp())
    delivery = (
        await connection.execute(select(func.min(t.deliveries.c.at)).where(t.deliveries.c.at > ended))
    ).scalar_one()
    if not confirms or delivery is None:
        return None
    return max(min(confirms), float(delivery))


async def _check(connection: AsyncConnection, ledger: Ledger, service: str, dead: set[str]) -> Report:
    t = ledger.tables
    sent, effects, deliveries = t.sent.c, t.effects.c, t.deliveries.c
    count = func.count()
    total_sent = await _scalar(connection, select(count).select_from(t.sent))
    confirmed = await _scalar(connection, select(count).where(sent.confirmed_at.is_not(None)))
    handled = await _scalar(connection, select(func.count(effects.message_id.distinct())))
    effect_rows = await _scalar(connection, select(count).select_from(t.effects))
    delivery_rows = await _scalar(connection, select(count).select_from(t.deliveries))
    delivered = await _scalar(connection, select(func.count(deliveries.message_id.distinct())))
    unhandled = select(sent.message_id).where(
        sent.confirmed_at.is_not(None), ~exists().where(effects.message_id == sent.message_id)
    )
    unhandled_ids: list[str] = list((await connection.execute(unhandled)).scalars())
    missing = [message_id for message_id in unhandled_ids if message_id not in dead]
    outbox = outbox_table.c
    has_outbox_row = exists().where(
        and_(outbox.service == service, outbox.message_id == t.orders.c.message_id)
    )
    orphans = await _scalar(connection, select(count).select_from(t.orders).where(~has_outbox_row))
    unsent = await _scalar(
        connection,
        select(count).select_from(outbox_table).where(outbox.service == service, outbox.sent_at.is_(None)),
    )
    first, last = (
        await connection.execute(select(func.min(sent.created_at), func.max(sent.confirmed_at)))
    ).one()
    throughput = (
        confirmed / (last - first) if first is not None and last is not None and last > first else 0.0
    )
    recoveries = []
    faults = t.faults.c
    for row in await connection.execute(
        select(faults.name, faults.started_at, faults.ended_at).order_by(faults.id)
    ):
        name, started, ended = str(row[0]), float(row[1]), float(row[2])
        back = await _back_after(connection, ledger, service, ended)
        recoveries.append(Recovery(name, started, ended, None if back is None else back - ended))
    return Report(
        sent=total_sent,
        confirmed=confirmed,
        handled=handled,
        lost=len(missing),
        duplicate_deliveries=delivery_rows - delivered,
        duplicate_effects=effect_rows - handled,
        dead_lettered=len(dead),
        orphans=orphans,
        unsent=unsent,
        throughput=throughput,
        recoveries=tuple(recoveries),
        lost_ids=tuple(sorted(missing)[:5]),
    )
