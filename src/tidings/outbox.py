"""The transactional outbox: messages written in the caller's database transaction.

    async with sessions() as session, session.begin():
        session.add(Order(id="o-1"))
        await bus.publish(OrderPlaced(order_id="o-1"), session=session)
    # committed: the order and the message, or neither

`Bus.publish(..., session=s)` and `Bus.send(..., session=s)` land here (through `Sender.dispatch`):
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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from tidings.envelope import Envelope
from tidings.errors import ConfigurationError
from tidings.storage import outbox_table, utc_now
from tidings.storage.crashpoints import crash_point
from tidings.storage.database import check_session, translate_errors
from tidings.storage_settings import OutboxSettings

__all__ = ["Outbox", "OutboxSettings"]


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

    def __init__(self, service: str, engine: AsyncEngine, settings: OutboxSettings | None = None) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"database= takes a SQLAlchemy AsyncEngine (create_async_engine), not {type(engine).__name__}"
            )
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"the outbox supports SQLite and PostgreSQL, not {engine.dialect.name}")
        self.service = service
        self.engine = engine
        self.settings = settings or OutboxSettings()
        self._wake = asyncio.Event()

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
        """Return when woken by a commit (after `linger`), or after `poll_interval` seconds.

        A cancellation always comes through, even one that lands as a commit wakes the relay.
        """
        try:
            # Not `asyncio.wait_for`: on Python 3.11 it returns normally when it is cancelled just
            # as the awaited event is set, and the relay, its cancellation lost, would go on
            # polling for ever (a stopping bus waits for it: run() and close() never return).
            async with asyncio.timeout(poll_interval):
                await self._wake.wait()
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
