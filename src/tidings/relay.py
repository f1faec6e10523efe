"""The relay: ships committed outbox rows to the transport, then marks them sent.

One round (`Relay.relay_once`):

1. **Claim**, in a short transaction: lease the oldest claimable rows of this service (not sent, not
   leased by a live relay, not waiting after a refusal) with
   `UPDATE .. WHERE id IN (SELECT .. ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ..`.
   On PostgreSQL SKIP LOCKED lets relays claim side by side; SQLite takes one writer at a time.
   The lease, not a transaction held open, protects the rows while they are shipped: no database
   lock is held across broker round trips.
2. **Order** (`plan`): a row waits while an older unsent row of its transaction or of its subject is
   with another relay. The rest form chains (rows linked by a transaction or a subject), each shipped
   one row after the other; chains go side by side.
3. **Ship**: `transport.publish` / `transport.send`; their return is the confirmation. While the
   round ships, its lease is renewed every third of `claim_timeout` (`_Lease`), so a long round
   (a slow broker, a big batch) keeps its rows from a second relay; a relay that cannot renew
   (a database error, its rows taken) starts no more rows that round.
4. **Settle**, in one short transaction: confirmed rows are marked sent; refused rows get
   `attempts + 1`, `last_error` and a backoff, and do not hold up the rows behind them; unshipped
   rows are released.

A refusal is a verdict on one message: `NoRoute` (nobody takes it), `PublishRefused` (the broker
nacked it), or a row that cannot be read. Any other `TransportError` is an outage: a
`PublishNotConfirmed` (the connection went before the confirm, or none came in time) says nothing
about the message. An outage stops every chain at the row it was on, ends the round, releases what
was not shipped (that row included, so it goes again before the rows behind it) and backs off,
doubling up to `MAX_OUTAGE_BACKOFF`; it is counted and logged once, however many rounds it lasts.

A relay killed between 3 and 4 leaves its rows leased: they are shipped again after the claim
timeout, and the consumers' inbox drops the duplicate. Sent rows are deleted after the retention
period, in bounded batches (`Relay.clean_up`).

Telemetry: each send continues the trace stored with its row (the `traceparent` of the code that
wrote it), and while something reads the outbox gauges (or the bus's heartbeat, `watch_backlog`)
the relay counts its unsent rows every `BACKLOG_INTERVAL` (`Relay.backlog`, `Relay.gauges`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from tidings.backoff import capped_exponential
from tidings.envelope import Envelope
from tidings.errors import (
    ConfigurationError,
    NoRoute,
    PublishRefused,
    TransportError,
    Unavailable,
)
from tidings.logs import in_service, logger
from tidings.outbox import Outbox
from tidings.outbox_order import OutboxRow, plan
from tidings.shutdown import finish_then_cancel
from tidings.storage import as_utc, outbox_table, utc_now
from tidings.storage.crashpoints import crash_point
from tidings.storage.database import delete_in_batches, translate_errors
from tidings.telemetry import NO_TELEMETRY, OutboxGauges, Telemetry, traced
from tidings.transports.base import Transport

__all__ = ["Relay", "RelayStats"]

log = logger("tidings.relay")

_table = outbox_table
_columns = _table.c

#: Seconds a stopping relay gives its current round to finish (it is cancelled after that).
SHUTDOWN_GRACE = 10.0

#: The transport refused this one message (not itself failing): the row is refused, its chain goes on.
#: Every other `TransportError` (`PublishNotConfirmed` among them) is an outage: the chain waits.
_REFUSALS = (NoRoute, PublishRefused)

#: Seconds a relay waits after the first failed round of an outage, doubled per failed round after
#: it up to the longest.
OUTAGE_BACKOFF = 0.5
MAX_OUTAGE_BACKOFF = 30.0

#: Seconds between a relay's looks at its backlog for the outbox gauges, while something reads them.
BACKLOG_INTERVAL = 5.0


def outage_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th failed round in a row (1, 2, ...)."""
    return capped_exponential(OUTAGE_BACKOFF, MAX_OUTAGE_BACKOFF, failures - 1)


@dataclass(slots=True)
class RelayStats:
    """What a relay has done since it started (health checks, the demo, tests)."""

    #: Rounds done (claims made, empty or not): a relay that is alive keeps counting.
    rounds: int = 0
    sent: int = 0
    #: Refusals: a row refused three times counts three.
    refused: int = 0
    #: Rows claimed but left for later because an older row of their chain was with another relay.
    held_back: int = 0
    #: Outages: runs of rounds cut short because the transport or the database was unavailable,
    #: each counted once however many rounds it lasted.
    outages: int = 0
    #: Rounds that stopped shipping because their lease could not be renewed.
    leases_lost: int = 0
    #: Sent rows deleted after the retention period.
    deleted: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class _Round:
    sent: list[int] = field(default_factory=list)
    refused: list[tuple[OutboxRow, BaseException]] = field(default_factory=list)
    outage: TransportError | None = None


class _Lease:
    """Keeps a round's claim alive while its rows are shipped: `claimed_until` is renewed every
    third of `claim_timeout`.

    A row may start only while a third of the lease is left (`holds`), the time its publish gets
    before another relay could claim it. A renewal that fails, or finds some of the rows no longer
    this relay's, marks the lease lost: the round starts no more rows.
    """

    def __init__(self, relay: Relay, ids: Sequence[int], claimed_at: float) -> None:
        self._relay = relay
        self._ids = list(ids)
        self._timeout = relay.settings.claim_timeout
        self._loop = asyncio.get_running_loop()
        #: Loop time the lease runs out: taken before the claim (or renewal) computed its time, so
        #: never later than the database's `claimed_until`.
        self._expires = claimed_at + self._timeout
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Why the lease is lost, once it is.
        self.lost: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    def holds(self) -> bool:
        if self.lost is None and self._loop.time() >= self._expires - self._timeout / 3:
            self.lost = f"not renewed within {self._timeout * 2 / 3:g} s"
        return self.lost is None

    async def stop(self) -> None:
        """Stop renewing (a renewal under way finishes first)."""
        self._done.set()
        if self._task is None:
            return
        try:
            await self._task
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    async def _keep(self) -> None:
        while self.lost is None:
            # Renew when two thirds are left: a slow renewal still lands well before the end.
            wait = self._expires - self._timeout * 2 / 3 - self._loop.time()
            # Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that lands as
            # the event is set (`Outbox.wait_for_work` says more).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._done.wait()
            if self._done.is_set():
                return
            started = self._loop.time()
            try:
                # Cancelled meanwhile, the UPDATE finishes first: the driver must not answer a
                # statement nobody waits for.
                renewed = await finish_then_cancel(self._relay._renew(self._ids))
            except Exception as error:
                self.lost = f"renewal failed: {type(error).__name__}: {error}"
                return
            if renewed < len(self._ids):
                self.lost = (
                    f"{len(self._ids) - renewed} of its {len(self._ids)} rows are not its own any more"
                )
                return
            self._expires = started + self._timeout


class Relay:
    """Ships one service's committed outbox rows to a transport."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        telemetry: Telemetry = NO_TELEMETRY,
        *,
        watch_backlog: bool = False,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.telemetry = telemetry
        #: The last look at the backlog: the telemetry's gauges, or plain ones when it has none.
        self.gauges = telemetry.outbox_gauges(outbox.service) or OutboxGauges(outbox.service)
        #: Look every `BACKLOG_INTERVAL` whether or not the telemetry reads the gauges (for the
        #: bus's heartbeat, which reports the backlog).
        self.watch_backlog = watch_backlog
        self.settings = outbox.settings
        self.engine = outbox.engine
        self.service = outbox.service
        self._postgresql = outbox.engine.dialect.name == "postgresql"
        #: Names this relay's leases, so it releases only its own.
        self.relay_id = uuid.uuid4().hex
        self.stats = RelayStats()
        self._more_waiting = False
        self._idle = True

    async def run(self) -> None:
        """Ship rows until cancelled; outages are logged and waited out, never raised."""
        in_service(self.service)  # the relay's records name its service (it runs as a task)
        loop = asyncio.get_running_loop()
        next_cleanup = next_look = loop.time()
        failures = 0  # failed rounds in a row: the outage going on, if any
        outage_began = 0.0
        while True:
            # Cleared before the claim: a commit during the round wakes the next wait at once.
            self.outbox.clear_wake()
            try:
                # A round cut off between its claim and its settle would leave its rows leased to
                # nobody until `claim_timeout`; finishing it hands them on at once.
                await finish_then_cancel(self.relay_once(), grace=SHUTDOWN_GRACE)
                if loop.time() >= next_cleanup:
                    await self.clean_up()
                    next_cleanup = loop.time() + self.settings.cleanup_interval
            except Exception as error:
                failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                delay = outage_delay(failures)
                # One count and one warning per outage: a broker down for an hour is one event,
                # not a warning every 30 s.
                if failures > 1:
                    log.debug(
                        "outbox relay of %s: still failing (%s); again in %.1fs", self.service, error, delay
                    )
                else:
                    self.stats.outages += 1
                    outage_began = loop.time()
                    if isinstance(error, TransportError | Unavailable | ConfigurationError):
                        # The transport logged its broker's outage already: this is one effect of it.
                        level = logging.INFO if self.transport.in_outage else logging.WARNING
                        log.log(
                            level,
                            "outbox relay of %s: %s; trying again in %.1fs, backing off up to %.0fs",
                            self.service,
                            error,
                            delay,
                            MAX_OUTAGE_BACKOFF,
                        )
                    else:
                        log.exception("outbox relay of %s failed; trying again in %.1fs", self.service, delay)
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info(
                    "outbox relay of %s: going again after %.1fs (%d failed rounds)",
                    self.service,
                    loop.time() - outage_began,
                    failures,
                )
            failures = 0
            if loop.time() >= next_look and self._backlog_wanted():
                await self._look_at_backlog()
                next_look = loop.time() + BACKLOG_INTERVAL
            if not self._more_waiting:
                await self.outbox.wait_for_work(self.settings.poll_interval)

    async def relay_once(self) -> int:
        """Claim, ship and settle one batch; returns how many rows were shipped or refused.

        Raises the transport's error after settling when an outage cut the round short.
        """
        claimed_at = asyncio.get_running_loop().time()
        claimed, elsewhere = await self._claim()
        self.stats.rounds += 1
        if not claimed:
            self._more_waiting = False
            return 0
        chains, held = plan(claimed, elsewhere)
        result = _Round()
        lease = _Lease(self, [row.id for row in claimed], claimed_at)
        try:
            lease.start()
            try:
                await self._ship(chains, result, lease)
            finally:
                await lease.stop()
            if result.sent:
                crash_point("relay-after-confirm")
        except BaseException:
            # Cancelled mid-round: record what the transport confirmed, release the rest.
            with contextlib.suppress(Exception):
                await self._settle(claimed, result)
            raise
        await self._settle(claimed, result)
        self.stats.sent += len(result.sent)
        self.stats.refused += len(result.refused)
        self.stats.held_back += len(held)
        if lease.lost is not None:
            self.stats.leases_lost += 1
            self.stats.last_error = f"lease lost: {lease.lost}"
            log.warning(
                "outbox relay of %s stopped its round after %d of %d rows: its lease was lost (%s)",
                self.service,
                len(result.sent) + len(result.refused),
                len(claimed),
                lease.lost,
            )
        for row, error in result.refused:
            self.stats.last_error = f"{type(error).__name__}: {error}"
            log.warning(
                "outbox row %d of %s refused (attempt %d), tried again later: %s",
                row.id,
                self.service,
                row.attempts + 1,
                self.stats.last_error,
            )
        if result.outage is not None:
            raise result.outage
        shipped = len(result.sent) + len(result.refused)
        self._more_waiting = len(claimed) >= self.settings.batch_size and shipped > 0
        return shipped

    async def backlog(self) -> tuple[int, datetime | None]:
        """How many rows of this service are not sent yet, and when the oldest of them was written."""
        query = select(func.count(), func.min(_columns.created_at)).where(
            _columns.service == self.service, _columns.sent_at.is_(None)
        )
        with translate_errors():
            async with self.engine.connect() as connection:
                rows, oldest = (await connection.execute(query)).one()
        return int(rows), as_utc(oldest)

    def _backlog_wanted(self) -> bool:
        return self.watch_backlog or self.gauges.wanted()

    async def _look_at_backlog(self) -> None:
        try:
            self.gauges.update(*await self.backlog())
        except Exception as error:
            # The gauges keep their last value; the round that follows reports a real outage.
            log.debug("outbox relay of %s: no look at the backlog: %s", self.service, error)

    async def clean_up(self) -> int:
        """Delete sent rows older than the retention period, in bounded batches; returns how many."""
        cutoff = utc_now() - self.settings.retention
        deleted = await delete_in_batches(
            self._bookkeeping,
            _table,
            _columns.id,
            (_columns.service == self.service, _columns.sent_at.is_not(None), _columns.sent_at < cutoff),
            self.settings.cleanup_batch_size,
        )
        self.stats.deleted += deleted
        return deleted

    # -- the steps of a round ----------------------------------------------------------------

    async def _claim(self) -> tuple[list[OutboxRow], list[OutboxRow]]:
        now = utc_now()
        claimable = (
            select(_columns.id)
            .where(
                _columns.service == self.service,
                _columns.sent_at.is_(None),
                or_(_columns.claimed_until.is_(None), _columns.claimed_until < now),
                or_(_columns.next_attempt_at.is_(None), _columns.next_attempt_at <= now),
            )
            .order_by(_columns.id)
            .limit(self.settings.batch_size)
        )
        if self._idle:
            # An idle relay looks before it writes: on SQLite every claim takes the one write
            # lock, which the service's own transactions are waiting for.
            with translate_errors():
                async with self.engine.connect() as connection:
                    if (await connection.execute(claimable.limit(1))).first() is None:
                        return [], []
        claimable = claimable.with_for_update(skip_locked=True)
        claim = (
            update(_table)
            .where(_columns.id.in_(claimable.scalar_subquery()))
            .values(
                claimed_by=self.relay_id,
                claimed_until=now + timedelta(seconds=self.settings.claim_timeout),
            )
            .returning(
                _columns.id,
                _columns.transaction_key,
                _columns.subject,
                _columns.headers,
                _columns.body,
                _columns.queue,
                _columns.not_before,
                _columns.attempts,
            )
        )
        with translate_errors():
            async with self._bookkeeping() as connection:
                claimed = sorted(
                    (OutboxRow(**row._asdict()) for row in await connection.execute(claim)),
                    key=lambda r: r.id,
                )
                elsewhere = await self._older_elsewhere(connection, claimed) if claimed else []
        self._idle = not claimed
        return claimed, elsewhere

    async def _older_elsewhere(
        self, connection: AsyncConnection, claimed: Sequence[OutboxRow]
    ) -> list[OutboxRow]:
        """Unsent rows older than some claimed row, not claimed here, sharing its transaction or subject.

        Rows refused before (attempts > 0) are left out: a refused row does not hold up its chain.
        """
        subjects = {row.subject for row in claimed if row.subject is not None}
        query = select(_columns.id, _columns.transaction_key, _columns.subject).where(
            _columns.service == self.service,
            _columns.sent_at.is_(None),
            _columns.attempts == 0,
            _columns.id < claimed[-1].id,
            _columns.id.not_in([row.id for row in claimed]),
            or_(
                _columns.transaction_key.in_({row.transaction_key for row in claimed}),
                _columns.subject.in_(subjects),
            ),
        )
        return [OutboxRow(**row._asdict()) for row in await connection.execute(query)]

    async def _ship(
        self, chains: Sequence[Sequence[OutboxRow]], result: _Round, lease: _Lease | None = None
    ) -> None:
        slots = asyncio.Semaphore(self.settings.max_in_flight)

        async def ship_chain(chain: Sequence[OutboxRow]) -> None:
            async with slots:
                for row in chain:
                    # After an outage or with the lease gone, the chain stops at this row: it and
                    # the rows behind it are released and go again, in order, in a later round.
                    if result.outage is not None or (lease is not None and not lease.holds()):
                        return
                    try:
                        await _ship_row(self.transport, row, self.telemetry)
                    except _REFUSALS as error:
                        result.refused.append((row, error))
                    except TransportError as error:
                        # Not a verdict on the row (a lost connection, no confirm in time): had
                        # the chain gone on, the rows behind it would overtake it.
                        result.outage = error
                        return
                    except Exception as error:
                        # An unreadable row or a transport bug: this row is refused, not the batch.
                        log.exception("outbox row %d of %s could not be shipped", row.id, self.service)
                        result.refused.append((row, error))
                    else:
                        result.sent.append(row.id)

        await asyncio.gather(*(ship_chain(chain) for chain in chains))

    async def _settle(self, claimed: Sequence[OutboxRow], result: _Round) -> None:
        now = utc_now()
        done = set(result.sent) | {row.id for row, _ in result.refused}
        unshipped = [row.id for row in claimed if row.id not in done]
        with translate_errors():
            async with self._bookkeeping() as connection:
                if result.sent:
                    await connection.execute(
                        update(_table)
                        .where(_columns.id.in_(result.sent))
                        .values(sent_at=now, claimed_by=None, claimed_until=None)
                    )
                if result.refused:
                    await connection.execute(
                        update(_table)
                        # Only its own: a relay that lost its lease leaves the row to its new holder.
                        .where(_columns.id == bindparam("row_id"), _columns.claimed_by == self.relay_id)
                        .values(
                            attempts=_columns.attempts + 1,
                            last_error=bindparam("error"),
                            next_attempt_at=bindparam("retry_at"),
                            claimed_by=None,
                            claimed_until=None,
                        ),
                        [
                            {
                                "row_id": row.id,
                                "error": f"{type(error).__name__}: {error}"[:2000],
                                "retry_at": now + timedelta(seconds=self._backoff(row.attempts)),
                            }
                            for row, error in result.refused
                        ],
                    )
                if unshipped:
                    await connection.execute(
                        update(_table)
                        .where(_columns.id.in_(unshipped), _columns.claimed_by == self.relay_id)
                        .values(claimed_by=None, claimed_until=None)
                    )

    async def _renew(self, ids: Sequence[int]) -> int:
        """Extend this relay's lease on `ids`; returns how many of them it still held."""
        until = utc_now() + timedelta(seconds=self.settings.claim_timeout)
        with translate_errors():
            async with self._bookkeeping() as connection:
                renewed = await connection.execute(
                    update(_table)
                    .where(
                        _columns.id.in_(ids),
                        _columns.claimed_by == self.relay_id,
                        _columns.sent_at.is_(None),
                    )
                    .values(claimed_until=until)
                )
        return int(renewed.rowcount)

    @contextlib.asynccontextmanager
    async def _bookkeeping(self) -> AsyncIterator[AsyncConnection]:
        """A transaction for the relay's own claims, marks and deletions.

        On PostgreSQL it commits without waiting for the WAL flush: losing one of these commits
        in a server crash only ships a row again (the inbox drops the copy), never loses one, and
        sparing the fsync doubles what the relay moves on a busy disk.
        """
        async with self.engine.begin() as connection:
            if self._postgresql:
                await connection.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield connection

    def _backoff(self, attempts: int) -> float:
        return capped_exponential(self.settings.refused_backoff, self.settings.max_refused_backoff, attempts)


async def _ship_row(transport: Transport, row: OutboxRow, telemetry: Telemetry = NO_TELEMETRY) -> None:
    envelope = Envelope.from_headers(json.loads(row.headers), row.body)
    not_before = as_utc(row.not_before)
    # The send continues the trace stored with the row (its `traceparent`): that of the code that
    # wrote it, not the relay's.
    shipping = telemetry.relaying(transport, envelope, row.queue)
    if row.queue is None:
        await traced(shipping, transport.publish(envelope, not_before=not_before))
    else:
        await traced(shipping, transport.send(envelope, row.queue, not_before=not_before))
