"""Databases for the saga tests: a SQLite file, and PostgreSQL in a schema of its own.

Each database URL is the short form the test processes understand (`tests/storage/databases.py`):
`sqlite:<path>` or `postgresql:<schema>`, with the outbox, inbox, saga and test tables created.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import POSTGRES_HOST, require_server
from tests.sagas.sagas import domain
from tests.storage.databases import POSTGRES_URL, engine_for
from tidings.sagas.store import metadata as saga_metadata
from tidings.storage import metadata

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


async def create_all(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for tables in (metadata, saga_metadata, domain):
            await connection.run_sync(tables.create_all)


async def database_url_for(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of `kind` with every table, as a short URL; dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:{tmp_path / 'service.db'}"
        engine = engine_for(url)
        await create_all(engine)
        await engine.dispose()
        yield url
        return
    require_server("PostgreSQL", POSTGRES_HOST)
    schema = f"tidings_saga_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(POSTGRES_URL, pool_size=1)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = engine_for(f"postgresql:{schema}")
        await create_all(engine)
        await engine.dispose()
        yield f"postgresql:{schema}"
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async for url in database_url_for(request.param, tmp_path):
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = engine_for(database_url, pool_size=10)  # (options apply to PostgreSQL only)
    yield engine
    await engine.dispose()


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """PostgreSQL only: where two transactions really run side by side (SQLite has one writer)."""
    async for url in database_url_for("postgresql", tmp_path):
        engine = engine_for(url, pool_size=10)
        yield engine
        await engine.dispose()
