"""The idempotent inbox: each handler call in a transaction that records the message as handled.

With `Bus(..., database=engine)` the bus installs `Inbox` as a middleware. For every delivery it

1. opens a transaction and exposes its session as `ctx.session` (the handler's own writes, and the
   messages it publishes or sends through `ctx`, which go to the outbox in that same transaction);
2. inserts (service, message id) into `tidings_inbox` *first*: if the row is already there the
   message was handled before (a redelivery after a crash, a duplicate on the wire), and it is
   acknowledged without calling the handler (`Stats.duplicates`);
3. calls the handler (and the rest of the chain), sends a returned `Reply` through the outbox too,
   commits, and only then lets the pipeline acknowledge the delivery.

A crash before the commit rolls everything back and the message is redelivered; a crash after it
leaves the record, so the redelivered copy is a duplicate. Two instances handling the same id at
once race on the primary key: the second insert waits for the first transaction and then does
nothing (PostgreSQL `ON CONFLICT DO NOTHING`; SQLite has one writer at a time), so exactly one
handler's effects commit.

Records are kept for `InboxSettings.retention` (the dedup window, 7 days by default) and deleted in
bounded batches by `Inbox.clean_up` (run by `Bus.run()`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tidings.context import Context
from tidings.errors import TransportError, Unavailable
from tidings.handlers import Next
from tidings.logs import in_service, logger
from tidings.messages import Message, Reply
from tidings.stats import Stats
from tidings.storage import inbox_table, utc_now
from tidings.storage.crashpoints import crash_point
from tidings.storage.database import delete_in_batches, insert_ignoring_duplicates, translate_errors
from tidings.storage_settings import InboxSettings
from tidings.telemetry import NO_TELEMETRY, Telemetry

__all__ = ["Inbox", "InboxSettings"]

log = logger("tidings.inbox")

_columns = inbox_table.c


class _HandlerRaised(Exception):
    """Carries a handler's own exception past `translate_errors` and out of the transaction."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class Inbox:
    """The middleware that makes a service's handlers idempotent (see the module docstring)."""

    def __init__(
        self,
        service: str,
        engine: AsyncEngine,
        stats: Stats,
        settings: InboxSettings | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self.service = service
        self.engine = engine
        self.stats = stats
        self.telemetry = telemetry
        self.settings = settings or InboxSettings()
        # expire_on_commit=False: objects a handler loaded stay readable after the commit.
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._record_statement = insert_ignoring_duplicates(inbox_table, engine.dialect.name)
        # SQLite has one writer at a time, and the inbox insert makes each handler's transaction a
        # writer from its first statement. Queueing them here hands the lock on at once; left to
        # SQLite, waiting connections poll with growing sleeps (up to 100 ms) and throughput drops.
        self._one_writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    async def __call__(self, ctx: Context, message: Message, call_next: Next) -> Any:
        if self._one_writer is None:
            return await self._handle(ctx, message, call_next)
        async with self._one_writer:
            return await self._handle(ctx, message, call_next)

    async def _handle(self, ctx: Context, message: Message, call_next: Next) -> Any:
        try:
            # Connecting, the inbox insert and the commit: a failure there is the database's.
            with translate_errors():
                async with self.sessions() as session:
                    async with session.begin():
                        if not await self._record(session, ctx.message_id):
                            self.stats.duplicates += 1
                            self.telemetry.duplicate(self.service, ctx.queue)
                            log.info(
                                "%s %s was handled before: acknowledged", ctx.envelope.type, ctx.message_id
                            )
                            return None
                        ctx.session = session
                        try:
                            result = await call_next(ctx, message)
                            if isinstance(result, Reply):
                                # The reply is one of the messages the handler emits: same transaction.
                                await ctx.reply(result)
                                result = None
                        except (SQLAlchemyError, Unavailable, TransportError):
                            raise  # the database (translated above) or the transport: an outage
                        except Exception as error:
                            # The handler's own failure, even an OSError or a TimeoutError (an HTTP
                            # call, a file): it follows the retry policy, it is no database outage.
                            raise _HandlerRaised(error) from error
                        finally:
                            ctx.session = None
                    crash_point("inbox-after-commit")
        except _HandlerRaised as raised:
            failure: Exception = raised.error
        else:
            return result
        raise failure  # outside the except block: the handler's exception as it was raised

    async def _record(self, session: AsyncSession, message_id: str) -> bool:
        """Insert the inbox record; False if (service, message id) is recorded already."""
        values = {"service": self.service, "message_id": message_id, "handled_at": utc_now()}
        if self._record_statement is not None:
            result = await session.execute(self._record_statement.returning(_columns.message_id), values)
            return result.first() is not None
        try:
            async with session.begin_nested():
                await session.execute(insert(inbox_table), values)
        except IntegrityError:
            return False
        return True

    async def clean_up(self) -> int:
        """Delete records older than the retention, in bounded batches; returns how many."""
        cutoff = utc_now() - self.settings.retention
        return await delete_in_batches(
            self.engine.begin,
            inbox_table,
            _columns.message_id,
            (_columns.service == self.service, _columns.handled_at < cutoff),
            self.settings.cleanup_batch_size,
        )

    async def clean_up_forever(self) -> None:
        """Run `clean_up` every `cleanup_interval` seconds until cancelled (`Bus.run()` does)."""
        in_service(self.service)  # its records name the service (it runs as a task)
        while True:
            try:
                deleted = await self.clean_up()  # a stop ends it after the batch in progress
                if deleted:
                    log.info("inbox of %s: %d records past the dedup window deleted", self.service, deleted)
            except Unavailable as error:
                log.warning("inbox cleanup of %s: %s", self.service, error)
            except Exception:
                log.exception("inbox cleanup of %s failed", self.service)
            await asyncio.sleep(self.settings.cleanup_interval)
