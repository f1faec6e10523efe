"""The SQL tables behind the transactional outbox and the idempotent inbox.

The tables live in `metadata`, a SQLAlchemy `MetaData` of their own, so a service adds them to its
migrations like any other table (see docs/outbox-inbox.md for Alembic):

    import tidings.storage
    target_metadata = [myapp.models.Base.metadata, tidings.storage.metadata]

`Bus.create_tables()` creates them directly for a quick start and for tests.

Times are stored as UTC (`DateTime(timezone=True)`: `timestamptz` on PostgreSQL, ISO text on SQLite,
where SQLAlchemy drops the offset: always pass UTC, read back through `as_utc`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tidings.envelope import MAX_MESSAGE_ID_LENGTH
from tidings.errors import ConfigurationError, Unavailable
from tidings.logs import logger

__all__ = [
    "as_utc",
    "create_tables",
    "inbox_table",
    "metadata",
    "outbox_table",
    "require_tables",
    "utc_now",
]

log = logger("tidings.storage")

metadata = MetaData()

# BigInteger ids on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the rowid alias that counts up.
_Id = BigInteger().with_variant(Integer(), "sqlite")

outbox_table = Table(
    "tidings_outbox",
    metadata,
    # Ids grow in insertion order: the relay sends in id order. AUTOINCREMENT on SQLite keeps ids
    # from being reused after the newest rows were cleaned up.
    Column("id", _Id, primary_key=True, autoincrement=True),
    #: The service whose bus wrote the row: its relay (and only it) ships the row.
    Column("service", String(255), nullable=False),
    #: Up to `MAX_MESSAGE_ID_LENGTH` (255): any id an AMQP peer may send (a shortstr).
    Column("message_id", String(MAX_MESSAGE_ID_LENGTH), nullable=False),
    #: `Envelope.to_headers()` as a JSON object.
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    #: Where a command or reply goes; NULL for a published event.
    Column("queue", String(255), nullable=True),
    Column("not_before", DateTime(timezone=True), nullable=True),
    #: Messages of one transaction, and messages with one subject, are sent in id order.
    Column("transaction_key", BigInteger, nullable=False),
    Column("subject", String(255), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: Set once the transport confirmed the message; the row is deleted after the retention period.
    Column("sent_at", DateTime(timezone=True), nullable=True),
    #: The relay holding the row (a lease): nobody else ships it before `claimed_until`.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    #: How often the transport refused the row (`NoRoute`, not confirmed), and why, last time.
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    #: A refused row is tried again from then on (backoff); the rows behind it do not wait.
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    # The relay's claim scans the pending rows of one service in id order.
    Index(
        "ix_tidings_outbox_pending",
        "service",
        "id",
        postgresql_where=text("sent_at IS NULL"),
        sqlite_where=text("sent_at IS NULL"),
    ),
    # Cleanup deletes the oldest sent rows.
    Index(
        "ix_tidings_outbox_sent",
        "service",
        "sent_at",
        postgresql_where=text("sent_at IS NOT NULL"),
        sqlite_where=text("sent_at IS NOT NULL"),
    ),
    sqlite_autoincrement=True,
)

inbox_table = Table(
    "tidings_inbox",
    metadata,
    # The primary key is the dedup: a second insert of (service, message id) is a duplicate.
    Column("service", String(255), primary_key=True),
    Column("message_id", String(MAX_MESSAGE_ID_LENGTH), primary_key=True),
    Column("handled_at", DateTime(timezone=True), nullable=False),
    Index("ix_tidings_inbox_handled_at", "service", "handled_at"),
)


async def create_tables(engine: AsyncEngine) -> None:
    """Create the outbox and inbox tables and their indexes if they do not exist."""
    from tidings.storage.database import translate_errors

    with translate_errors():
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)


async def require_tables(engine: AsyncEngine) -> None:
    """`ConfigurationError` naming the missing tables, and how to create them, if any is missing.

    A bus started without its tables would consume messages only to fail each one (and log a
    traceback for every try); failing at start says what to do instead. A database that does not
    answer is not checked (logged): the bus starts and waits the outage out.
    """
    from tidings.storage.database import translate_errors

    def missing(connection: Connection) -> list[str]:
        tables = inspect(connection)
        return [table.name for table in metadata.sorted_tables if not tables.has_table(table.name)]

    try:
        with translate_errors():
            async with engine.connect() as connection:
                absent = await connection.run_sync(missing)
    except Unavailable as error:
        # Services start in any order: a database that is down now is an outage, waited out per
        # message (`Stats.unavailable`), not a reason to refuse to start.
        log.warning("could not check the outbox and inbox tables: %s", error)
        return
    if absent:
        raise ConfigurationError(
            f"the database {engine.url.render_as_string(hide_password=True)!r} has no table "
            f"{', '.join(absent)}: run `await bus.create_tables()` once, or add `tidings.storage.metadata` "
            "to your migrations (docs/outbox-inbox.md)"
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """A time read back from the database as an aware UTC datetime (SQLite returns it naive)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
