"""Engines for the outbox/inbox tests, named by short URLs the crash-test processes understand.

`sqlite:<path>` is a SQLite file in WAL mode; `postgresql:<schema>` is the local test database,
seen through a schema of its own (so parallel runs never meet).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["LOCK_TIMEOUT", "POSTGRES_URL", "domain", "effects", "engine_for", "produced"]

#: How long a test's statement waits for another transaction's lock before it fails (PostgreSQL).
LOCK_TIMEOUT = "60s"

POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

#: The crash tests' own tables: what the producer committed, and what the consumer did.
domain = MetaData()
produced = Table("test_produced", domain, Column("seq", Integer, primary_key=True))
#: No unique constraint on purpose: a second effect of one message must show up as a second row.
effects = Table(
    "test_effects",
    domain,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seq", Integer, nullable=False),
    Column("message_id", String(64), nullable=False),
)


def sqlite_engine(path: Path | str) -> AsyncEngine:
    """An engine on a SQLite file in WAL mode, as docs/outbox-inbox.md recommends."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _wal(connection: object, _record: object) -> None:
        cursor = connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def postgres_engine(schema: str, **options: object) -> AsyncEngine:
    # synchronous_commit=off: the tests kill clients, never the server, so the server's own flush
    # to disk is not under test; without it each commit waits for an fsync of this shared machine.
    # lock_timeout: a statement stuck behind another transaction's lock fails with the statement
    # named, well before pytest-timeout ends the test with nothing to say but the event loop's select().
    settings = {"search_path": schema, "synchronous_commit": "off", "lock_timeout": LOCK_TIMEOUT}
    return create_async_engine(POSTGRES_URL, connect_args={"server_settings": settings}, **options)


def engine_for(url: str, **options: object) -> AsyncEngine:
    """The engine `url` (`sqlite:<path>` or `postgresql:<schema>`) names."""
    kind, _, where = url.partition(":")
    if kind == "sqlite":
        return sqlite_engine(where)
    if kind == "postgresql":
        return postgres_engine(where, **options)
    raise ValueError(f"not a test database URL: {url!r}")
