"""`tidings tables create package.module:bus`: the outbox and inbox tables in the bus's database.

What `await bus.create_tables()` does, from a shell: each missing table is created with its
indexes, existing ones are left alone. For migrations, `tidings.storage.metadata` goes to Alembic
instead (docs/outbox-inbox.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

from tidings.bus import Bus
from tidings.cli.worker import load_bus
from tidings.errors import ConfigurationError

__all__ = ["add_command", "create_tables"]


def add_command(commands: Any) -> None:
    """Add `tables` to the `tidings` command's subparsers."""
    parser = commands.add_parser("tables", help="create the outbox and inbox tables in a bus's database")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create",
        help="create tidings_outbox and tidings_inbox (and their indexes) where missing",
        description="Create the outbox and inbox tables in the database of a Bus(..., database=engine) "
        "where they are missing; existing tables are left as they are. With migrations, add "
        "tidings.storage.metadata to Alembic's target_metadata instead.",
    )
    create.add_argument("bus", help="the bus whose database to use, as package.module:attribute")
    create.set_defaults(run=_create)


def _create(args: argparse.Namespace) -> int:
    return asyncio.run(create_tables(load_bus(args.bus), sys.stdout))


async def create_tables(bus: Bus, out: TextIO) -> int:
    """Create the missing tables of `bus`'s database and say which; returns the exit code."""
    engine = bus.database
    if engine is None:
        raise ConfigurationError(f"service {bus.service!r} has no database: Bus(..., database=engine)")
    from tidings.storage import metadata
    from tidings.storage.database import translate_errors

    names = [table.name for table in metadata.sorted_tables]
    if bus.sagas is not None:  # the sagas' table, in a metadata of its own (docs/sagas.md)
        from tidings.sagas.store import metadata as saga_metadata

        names += [table.name for table in saga_metadata.sorted_tables]

    def absent(connection: Any) -> list[str]:
        from sqlalchemy import inspect

        tables = inspect(connection)
        return [name for name in names if not tables.has_table(name)]

    where = engine.url.render_as_string(hide_password=True)
    try:
        with translate_errors():
            async with engine.connect() as connection:
                missing = await connection.run_sync(absent)
        await bus.create_tables()
    finally:
        await engine.dispose()
    if missing:
        out.write(f"created {', '.join(missing)} in {where}\n")
    else:
        out.write(f"{', '.join(names)} already exist in {where}\n")
    return 0
