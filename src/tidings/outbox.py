"""The transactional outbox: messages written in the caller's database transaction.

    async with sessions() as session, session.begin():
        session.add(Order(id="o-1"))
        await bus.publish(OrderPlaced(order_id="o-1"), session=session)
    # committed: the order and the message, or neither

`Bus.publish(..., session=s)` and `Bus.send(..., session=s)` land here (through `Bus.dispatch`):
the envelope becomes a row of `tidings_outbox` inserted with `s`, so it commits or rolls back with
the caller's changes. The relay (`tidings.relay`) ships committed rows to the transport; a commit
that wrote rows wakes the relay of this process at once (a session `after_commit` hook), and the
relay polls as a fallback for rows committed by other processes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from tidings.envelope import Envelope
from tidings.errors import ConfigurationError
from tidings.storage import outbox_table, utc_now
from tidings.storage.crashpoints import crash_point
from tidings.storage.database import check_session, translate_errors

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.relay import Relay

__all__ = ["Outbox", "OutboxSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    """How the relay ships outbox rows and cleans up after them."""

    #: Rows claimed and shipped per round.
    batch_size: int = 100
    #: Seconds between looks at the table when no local commit woke the relay.
    poll_interval: float = 1.0
    #: Seconds the relay lets a wake-up wait, so the commits of that moment share one round
    #: (one claim and one mark for many rows, instead of two transactions per message).
    linger: float = 0.02
    #: Seconds a relay holds the rows it claimed; a relay that died releases them after this.
    claim_timeout: float = 30.0
    #: Ordering chains shipped at once (rows within a chain go one after the other).
    max_in_flight: int = 32
    #: First and longest wait before a refused row (`NoRoute`, not confirmed) is tried again.
    refused_backoff: float = 1.0
    max_refused_backoff: float = 300.0
    #: How long sent rows are kept (to answer "was it sent?") before they are deleted.
    retention: timedelta = timedelta(hours=1)
    #: Sent rows deleted per statement, and seconds between cleanup runs.
    cleanup_batch_size: int = 1000
    cleanup_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.cleanup_batch_size < 1 or self.max_in_flight < 1:
            raise ConfigurationError("outbox batch sizes and max_in_flight must be at least 1")
        if self.poll_interval <= 0 or self.claim_timeout <= 0 or self.linger < 0:
            raise ConfigurationError(
                "outbox poll_interval and claim_timeout must be positive, linger not negative"
            )


@dataclass(eq=False, slots=True)
class _SessionState:
    """What a session's current transaction wrote to outboxes (kept in `Session.info`)."""

    #: Shared by the rows of one transaction: the relay keeps their order.
    transaction_key: int | None = None
    outboxes: list[Outbox] = field(default_factory=list)

    def after_commit(self, session: Session) -> None:
        # after_commit also fires when a savepoint is released: only the outer commit counts.
        if session.in_nested_transaction() or not self.outboxes:
            return
        outboxes, self.outboxes = self.outboxes, []
        crash_point("outbox-after-commit")
        for outbox in outboxes:
            outbox.wake()

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            self.transaction_key = None
            self.outboxes = []


_STATE_KEY = "tidings.outbox"


class Outbox:
    """Writes envelopes into `tidings_outbox` in the caller's transaction; wakes the local relay."""

    def __init__(self, bus: Bus, engine: AsyncEngine, settings: OutboxSettings | None = None) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"database= takes a SQLAlchemy AsyncEngine (create_async_engine), not {type(engine).__name__}"
            )
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"the outbox supports SQLite and PostgreSQL, not {engine.dialect.name}")
        self.bus = bus
        self.service = bus.service
        self.engine = engine
        self.settings = settings or OutboxSettings()
        self._wake = asyncio.Event()
        self._relay: Relay | None = None

    @property
    def relay(self) -> Relay:
        """This service's relay (made on first use; `Bus.run()` and `tidings relay` run it)."""
        if self._relay is None:
            from tidings.relay import Relay

            self._relay = Relay(self)
        return self._relay

    async def write(
        self,
        session: Any,
        envelope: Envelope,
        *,
        queue: str | None,
        not_before: datetime | None = None,
    ) -> None:
        """Insert `envelope` for `queue` (None: publish) into the outbox within `session`'s transaction."""
        checked = check_session(session, self.engine)
        if not_before is not None:
            if not_before.tzinfo is None:
                raise ConfigurationError("a message's time (at=) must be an aware datetime")
            # SQLite keeps the wall time and drops the offset: store every time in UTC.
            not_before = not_before.astimezone(UTC)
        state = _state_of(checked)
        if state.transaction_key is None:
            state.transaction_key = secrets.randbits(63)
        row = {
            "service": self.service,
            "message_id": envelope.id,
            "headers": json.dumps(envelope.to_headers(), separators=(",", ":")),
            "body": envelope.body,
            "queue": queue,
            "not_before": not_before,
            "transaction_key": state.transaction_key,
            "subject": envelope.subject,
            "created_at": utc_now(),
        }
        with translate_errors():
            await checked.execute(insert(outbox_table), row)
        if self not in state.outboxes:
            state.outboxes.append(self)

    def wake(self) -> None:
        """Tell the relay in this process that committed rows are waiting."""
        self._wake.set()

    def clear_wake(self) -> None:
        self._wake.clear()

    async def wait_for_work(self, poll_interval: float) -> None:
        """Return when woken by a commit (after `linger`), or after `poll_interval` seconds."""
        try:
            await asyncio.wait_for(self._wake.wait(), poll_interval)
        except TimeoutError:
            return
        if self.settings.linger > 0:
            await asyncio.sleep(self.settings.linger)


def _state_of(session: AsyncSession) -> _SessionState:
    sync_session = session.sync_session
    state = sync_session.info.get(_STATE_KEY)
    if not isinstance(state, _SessionState):
        state = _SessionState()
        sync_session.info[_STATE_KEY] = state
        event.listen(sync_session, "after_commit", state.after_commit)
        event.listen(sync_session, "after_transaction_end", state.after_transaction_end)
    return state
