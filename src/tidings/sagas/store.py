"""The saga table, and reading and writing one instance's row inside a step's transaction.

One table for every saga of every service, `tidings_sagas`, in a `MetaData` of its own
(`tidings.sagas.store.metadata`), so services without sagas need no migration for it:

| column | |
|---|---|
| `service`, `saga`, `key` | the primary key: the service running it, the saga's name, the instance's key |
| `status` | the state the instance is in (a name from its declarations), NULL before any |
| `state` | the state model as JSON (`model_dump_json`) |
| `version` | 1 when created, one more at each saved step: the optimistic concurrency check |
| `created_at`, `updated_at` | UTC |
| `completed_at` | set when the saga completed; the row is deleted `SagaSettings.retention` later |

A step reads the row, runs, and writes it back with `WHERE version = <the version it read>`: no
row updated means another instance saved first, and the step runs again on the new state. Two
starting messages for one new key both insert; the primary key lets one through, and the other
runs again and finds the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tidings.errors import ConfigurationError, Unavailable
from tidings.storage import as_utc, utc_now
from tidings.storage.database import delete_in_batches, translate_errors

__all__ = ["SagaRow", "SagaStore", "metadata", "sagas_table"]

metadata = MetaData()

sagas_table = Table(
    "tidings_sagas",
    metadata,
    Column("service", String(255), primary_key=True),
    Column("saga", String(200), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("status", String(100), nullable=True),
    Column("state", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    # The cleanup deletes the oldest completed rows of a service.
    Index("ix_tidings_sagas_completed", "service", "completed_at"),
)

_columns = sagas_table.c

# Built once (a step runs three statements; building them per step costs more than running them
# on SQLite). The `s_` parameters select the row; the others are the values written.
_THIS = (
    _columns.service == bindparam("s_service"),
    _columns.saga == bindparam("s_saga"),
    _columns.key == bindparam("s_key"),
)
_LOAD = select(_columns.status, _columns.state, _columns.version, _columns.completed_at).where(*_THIS)
_INSERT = insert(sagas_table)
_UPDATE = (
    update(sagas_table)
    .where(*_THIS, _columns.version == bindparam("s_version"))
    .values(
        status=bindparam("status"),
        state=bindparam("state"),
        version=bindparam("version"),
        updated_at=bindparam("updated_at"),
        completed_at=bindparam("completed_at"),
    )
)


@dataclass(frozen=True, slots=True)
class SagaRow:
    """One instance as stored."""

    status: str | None
    state: str
    version: int
    completed_at: datetime | None

    @property
    def completed(self) -> bool:
        return self.completed_at is not None


class SagaStore:
    """The rows of one service's sagas; every read and write in the caller's session."""

    def __init__(self, service: str, engine: AsyncEngine) -> None:
        self.service = service
        self.engine = engine

    async def load(self, session: AsyncSession, saga: str, key: str) -> SagaRow | None:
        found = await session.execute(_LOAD, {"s_service": self.service, "s_saga": saga, "s_key": key})
        row = found.first()
        if row is None:
            return None
        return SagaRow(row.status, row.state, row.version, as_utc(row.completed_at))

    async def insert(
        self, session: AsyncSession, saga: str, key: str, *, status: str | None, state: str, completed: bool
    ) -> None:
        """Insert a new instance at version 1. A row already there (another start won the race)
        raises SQLAlchemy's `IntegrityError`, which the runner takes as a conflict."""
        now = utc_now()
        values = {
            "service": self.service,
            "saga": saga,
            "key": key,
            "status": status,
            "state": state,
            "version": 1,
            "created_at": now,
            "updated_at": now,
            "completed_at": now if completed else None,
        }
        await session.execute(_INSERT, values)

    async def update(
        self,
        session: AsyncSession,
        saga: str,
        key: str,
        *,
        version: int,
        status: str | None,
        state: str,
        completed: bool,
    ) -> bool:
        """Write the instance back if it is still at `version`; False if another step saved first."""
        now = utc_now()
        values = {
            "s_service": self.service,
            "s_saga": saga,
            "s_key": key,
            "s_version": version,
            "status": status,
            "state": state,
            "version": version + 1,
            "updated_at": now,
            "completed_at": now if completed else None,
        }
        result = await session.execute(_UPDATE, values)
        return int(result.rowcount) == 1  # type: ignore[attr-defined]

    async def create_table(self) -> None:
        with translate_errors():
            async with self.engine.begin() as connection:
                await connection.run_sync(metadata.create_all)

    async def require_table(self) -> None:
        """`ConfigurationError` if `tidings_sagas` is missing (a database that does not answer is
        an outage, waited out per message, as for the outbox and inbox tables)."""

        def present(connection: Connection) -> bool:
            return bool(inspect(connection).has_table(sagas_table.name))

        try:
            with translate_errors():
                async with self.engine.connect() as connection:
                    found = await connection.run_sync(present)
        except Unavailable:
            return
        if not found:
            raise ConfigurationError(
                f"the database {self.engine.url.render_as_string(hide_password=True)!r} has no table "
                "tidings_sagas: run `await bus.create_tables()` once, or add `tidings.sagas.store.metadata` "
                "to your migrations (docs/sagas.md)"
            )

    async def clean_up(self, older_than: datetime, batch_size: int) -> int:
        """Delete this service's sagas completed before `older_than`, in bounded batches."""
        return await delete_in_batches(
            self.engine.begin,
            sagas_table,
            _columns.key,
            (_columns.service == self.service, _columns.completed_at < older_than),
            batch_size,
        )
