"""`Retention`: old audit records and long-silent instances go, a batch at a time.

Each batch is its own short transaction, with a pause between batches: on SQLite (one writer at
a time) ingestion gets the lock between two batches instead of waiting behind one long delete.
"""

from __future__ import annotations

import asyncio
import time

from tidings.dashboard.store import Store
from tidings.logs import logger

__all__ = ["Retention"]

log = logger("tidings.dashboard")


class Retention:
    """Deletes records older than `keep` seconds, every `interval` seconds."""

    def __init__(
        self,
        store: Store,
        *,
        keep: float,
        interval: float = 60.0,
        batch: int = 2000,
        pause: float = 0.02,
    ) -> None:
        self.store = store
        self.keep = keep
        self.interval = interval
        self.batch = batch
        self.pause = pause
        self.deleted = 0

    async def once(self, now: float | None = None) -> int:
        """Delete every record older than the retention period, batch by batch; how many went."""
        before = (now if now is not None else time.time()) - self.keep
        deleted = 0
        while True:
            went = await self.store.delete_older(before, batch=self.batch)
            deleted += went
            if went < self.batch:
                break
            await asyncio.sleep(self.pause)  # let ingestion write between two batches
        await self.store.forget_instances(before)
        self.deleted += deleted
        return deleted

    async def run(self) -> None:
        while True:
            try:
                deleted = await self.once()
                if deleted:
                    log.info("retention: deleted %d audit records", deleted)
            except Exception as error:
                log.warning("retention: %s; trying again in %.0f s", error, self.interval)
            await asyncio.sleep(self.interval)
