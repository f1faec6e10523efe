"""`Sagas`: the sagas one service runs, their store, their counters and their table.

The bus makes one when its first saga is added (`bus.saga(OrderProcess)`) and registers the
handlers it returns like any other; it gets the service name, the engine and the settings, not
the bus. `Bus.start` checks the table through it, `Bus.create_tables` creates it, and `Bus.run`
runs its cleanup of completed sagas next to the inbox's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from tidings.errors import ConfigurationError, Unavailable
from tidings.logs import logger
from tidings.messages import Message
from tidings.sagas.declarations import Saga, definition_of
from tidings.sagas.runner import Listener, SagaRunner
from tidings.sagas.settings import SagaSettings
from tidings.sagas.stats import SagaStats
from tidings.sagas.store import SagaStore
from tidings.storage import utc_now

__all__ = ["Sagas"]

log = logger("tidings.sagas")


class Sagas:
    """One service's sagas (`bus.sagas`)."""

    def __init__(self, service: str, engine: AsyncEngine, settings: SagaSettings | None = None) -> None:
        self.service = service
        self.settings = settings or SagaSettings()
        self.store = SagaStore(service, engine)
        self.stats = SagaStats()
        self.runners: dict[str, SagaRunner] = {}
        self._listeners: list[Listener] = []

    def add(self, saga_type: type[Saga[Any]]) -> list[tuple[type[Message], Callable[..., Any]]]:
        """Take on `saga_type`; its handlers by message type, for the bus to register."""
        definition = definition_of(saga_type)
        if definition.name in self.runners:
            raise ConfigurationError(f"service {self.service!r} runs saga {definition.name!r} already")
        runner = SagaRunner(saga_type, self.store, self.stats, self.settings, self._listeners)
        self.runners[definition.name] = runner
        return runner.handlers()

    def on_transition(self, listener: Listener) -> None:
        """Call `listener` with every saved step (`Transition`); it runs inside the step's
        transaction, before the commit, so it should only record (a log line, a counter)."""
        self._listeners.append(listener)

    async def create_table(self) -> None:
        await self.store.create_table()

    async def require_table(self) -> None:
        await self.store.require_table()

    async def clean_up(self) -> int:
        """Delete sagas completed longer than `retention` ago; returns how many."""
        cutoff = utc_now() - self.settings.retention
        return await self.store.clean_up(cutoff, self.settings.cleanup_batch_size)

    async def clean_up_forever(self) -> None:
        """Run `clean_up` every `cleanup_interval` seconds until cancelled (`Bus.run()` does)."""
        while True:
            try:
                deleted = await self.clean_up()
                if deleted:
                    log.info("sagas of %s: %d completed sagas past retention deleted", self.service, deleted)
            except Unavailable as error:
                log.warning("saga cleanup of %s: %s", self.service, error)
            except Exception:
                log.exception("saga cleanup of %s failed", self.service)
            await asyncio.sleep(self.settings.cleanup_interval)
