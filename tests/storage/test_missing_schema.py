"""A bus with a database whose outbox/inbox tables are missing fails at start, saying how to create them.

It used to start, consume, fail every message as a handler attempt, and log a SQLAlchemy traceback
every half second.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import eventually, running
from tests.storage.databases import sqlite_engine
from tests.storage.messages import Credit
from tidings import Bus, ConfigurationError, Context


async def test_starting_without_the_tables_is_a_configuration_error_and_consumes_nothing(
    tmp_path: Path,
) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    engine = sqlite_engine(tmp_path / "empty.db")
    handled: list[int] = []
    bus = Bus("ledger", url, database=engine)

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        handled.append(command.seq)

    try:
        async with Bus("ledger", url) as plain:  # declares the queue; a message waits in it
            await plain.send(Credit(account="a", seq=1), to="ledger")
            with pytest.raises(ConfigurationError, match=r"tidings_inbox.*bus\.create_tables\(\)"):
                await bus.start()
            await bus.create_tables()
            async with running(bus):
                await eventually(lambda: handled == [1])
        assert bus.stats.failed_attempts == 0
    finally:
        await engine.dispose()
