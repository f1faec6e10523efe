"""Databases for the outbox and inbox tests: a SQLite file, and PostgreSQL in a schema of its own.

PostgreSQL tests skip with the reason when the server does not answer, and fail under CI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.storage.databases import (
    LOCK_TIMEOUT,
    POSTGRES_URL,
    domain,
    engine_for,
    postgres_engine,
    sqlite_engine,
)
from tidings.storage import metadata

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


async def _postgres_schema() -> AsyncIterator[str]:
    schema = f"tidings_{uuid.uuid4().hex[:12]}"
    # The DROP SCHEMA at the end waits for every lock in the schema: a session a test left holding
    # one makes it fail with that said (lock_timeout), not hang.
    settings = {"lock_timeout": LOCK_TIMEOUT}
    admin = create_async_engine(POSTGRES_URL, pool_size=1, connect_args={"server_settings": settings})
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
        await connection.run_sync(domain.create_all)
    await engine.dispose()


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An AsyncEngine on a fresh database with the outbox and inbox tables."""
    engine = engine_for(database_url)
    yield engine
    await engine.dispose()
