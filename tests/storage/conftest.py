"""Databases for the outbox and inbox tests: a SQLite file, and PostgreSQL in a schema of its own.

PostgreSQL tests skip with the reason when the server does not answer, and fail under CI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tidings.storage import metadata

POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def sqlite_engine(path: Path) -> AsyncEngine:
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
    """An engine whose connections see only `schema` (so parallel test runs never meet)."""
    return create_async_engine(
        POSTGRES_URL, connect_args={"server_settings": {"search_path": schema}}, **options
    )


async def _postgres_schema() -> AsyncIterator[str]:
    schema = f"tidings_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:
        await admin.dispose()
        if os.environ.get("CI"):
            raise error
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}: {error}")
    try:
        yield schema
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database for the test, as a URL the crash-test processes understand (tables created).

    `sqlite:<path>` or `postgresql:<schema>`: see `tests/storage/app.py`.
    """
    kind = request.param
    if kind == "sqlite":
        path = tmp_path / "service.db"
        engine = sqlite_engine(path)
        await _create(engine)
        yield f"sqlite:{path}"
        return
    async for schema in _postgres_schema():
        engine = postgres_engine(schema)
        await _create(engine)
        yield f"postgresql:{schema}"


async def _create(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await engine.dispose()


def engine_for(url: str, **options: object) -> AsyncEngine:
    """The engine a `database_url` names."""
    kind, _, where = url.partition(":")
    return sqlite_engine(Path(where)) if kind == "sqlite" else postgres_engine(where, **options)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An AsyncEngine on a fresh database with the outbox and inbox tables."""
    engine = engine_for(database_url)
    yield engine
    await engine.dispose()
