"""The boundary to SQLAlchemy: translate its errors, check the caller's session, dialect bits, and
the batched deletes of old rows that the inbox and the relay share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    UnboundExecutionError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql.dml import Insert

from tidings.errors import ConfigurationError, Unavailable
from tidings.logs import logger
from tidings.shutdown import finish_then_cancel

__all__ = [
    "check_session",
    "delete_in_batches",
    "insert_ignoring_duplicates",
    "is_unavailable",
    "translate_errors",
]

log = logger("tidings.storage")

# sqlite3 raises OperationalError for a missing table or a syntax error as much as for a locked or
# unreadable file: only these result codes mean "the database is unavailable right now".
_SQLITE_UNAVAILABLE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_PROTOCOL",
    "SQLITE_NOLFS",
)


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database is down or busy, not that the statement is wrong."""
    if isinstance(error, DBAPIError):
        if error.connection_invalidated or isinstance(error, InterfaceError):
            return True
        if isinstance(error, OperationalError):
            sqlite_code = getattr(error.orig, "sqlite_errorname", None)
            return sqlite_code is None or sqlite_code.startswith(_SQLITE_UNAVAILABLE)
        return False
    # Connecting raises the driver's own errors (asyncpg: OSError subclasses) or a pool timeout.
    return isinstance(error, PoolTimeout | OSError | TimeoutError)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn "the database is unavailable" errors into `tidings.errors.Unavailable`."""
    try:
        yield
    except Exception as error:
        if is_unavailable(error):
            raise Unavailable(f"database unavailable: {_describe(error)}") from error
        raise


def _describe(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    return f"{type(original).__name__}: {original}".splitlines()[0]


def check_session(session: Any, engine: AsyncEngine) -> AsyncSession:
    """`session` if it is an `AsyncSession` of `engine` with a transaction open; else ConfigurationError.

    The outbox row must commit or roll back with the caller's changes: a session outside a
    transaction would write it in a transaction nobody commits, one on another engine in a database
    the relay never reads.
    """
    if not isinstance(session, AsyncSession):
        raise ConfigurationError(f"session= takes a SQLAlchemy AsyncSession, not {type(session).__name__}")
    if not session.in_transaction():
        raise ConfigurationError(
            "session= needs a transaction in progress (async with session.begin(): ...), "
            "so the message commits or rolls back with your changes"
        )
    try:
        bind = session.get_bind()
    except UnboundExecutionError:
        raise ConfigurationError("session= is bound to no engine") from None
    bound_engine = bind.engine if isinstance(bind, Connection) else bind
    if bound_engine is not engine.sync_engine:
        raise ConfigurationError(
            f"session= is bound to {bound_engine.url.render_as_string(hide_password=True)!r}, "
            f"not to the bus's database {engine.url.render_as_string(hide_password=True)!r}"
        )
    return session


def insert_ignoring_duplicates(table: Table, dialect_name: str) -> Insert | None:
    """An INSERT that does nothing on a primary key conflict, or None if the dialect has none."""
    if dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return None


async def delete_in_batches(
    begin: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
    table: Table,
    key: ColumnElement[Any],
    conditions: tuple[ColumnElement[bool], ...],
    batch_size: int,
) -> int:
    """Delete the rows of `table` that meet `conditions`, at most `batch_size` per transaction
    (`begin()` opens one); returns how many.

    Bounded batches keep each transaction (and its locks) short; `SKIP LOCKED` leaves rows that
    another cleaner is deleting to it, and the loop lets other work run between batches. Cancelled,
    it ends after the batch in progress, so a stopping bus never waits for the whole backlog.
    """
    batch = select(key).where(*conditions).limit(batch_size).with_for_update(skip_locked=True)
    statement = delete(table).where(*conditions, key.in_(batch.scalar_subquery()))

    async def one_batch() -> int:
        with translate_errors():
            async with begin() as connection:
                return int((await connection.execute(statement)).rowcount)

    total = 0
    while True:
        # A stop lets the DELETE in progress finish (the driver would otherwise answer a loop that
        # may be gone) but not the backlog: it lands between batches.
        deleted = await finish_then_cancel(one_batch())
        total += deleted
        if deleted < batch_size:
            return total
        await asyncio.sleep(0)
