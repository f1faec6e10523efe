"""The database a verification run uses, from the URL a user types.

`postgresql://user@host/db` and `sqlite:///path.db` are what people have at hand; SQLAlchemy's
asyncio engine wants a driver in the scheme (`postgresql+asyncpg`, `sqlite+aiosqlite`), so it is
added when missing. A SQLite file runs in WAL mode with a long busy timeout: the producers, the
consumers and the checker are separate processes writing to one file.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tidings.errors import ConfigurationError

__all__ = ["async_url", "engine_for"]

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_url(url: str) -> str:
    """`url` with the asyncio driver tidings uses for its database; `ConfigurationError` otherwise."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ConfigurationError(f"not a database URL: {url!r} (postgresql://... or sqlite:///path.db)")
    scheme = _DRIVERS.get(scheme.lower(), scheme)
    if scheme not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
        raise ConfigurationError(f"tidings verify takes PostgreSQL or SQLite, not {url.split(':')[0]!r}")
    return f"{scheme}://{rest}"


def engine_for(url: str, **options: Any) -> AsyncEngine:
    """An engine on the database `url` names (see the module docstring)."""
    full = async_url(url)
    if full.startswith("sqlite"):
        engine = create_async_engine(full, connect_args={"timeout": 60})

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # A pooled connection does not survive a restart of the server: check each before use.
    options.setdefault("pool_pre_ping", True)
    return create_async_engine(full, **options)


def shown(url: str) -> str:
    """`url` with its password hidden, for messages."""
    return make_url(async_url(url)).render_as_string(hide_password=True)
