"""Writing ledger records through an outage: a record the database could not take is tried again.

The producers and consumers keep their ledger in the database under test; when that database
crashes (a chaos scenario, or the user restarting it during `tidings verify`), a record must wait
for it rather than be dropped, or the checker would count a loss that did not happen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tidings.backoff import capped_exponential
from tidings.errors import Unavailable

__all__ = ["DATABASE_ERRORS", "retrying"]

log = logging.getLogger("tidings.verify")

T = TypeVar("T")

#: What a database that is down (or restarting) raises through SQLAlchemy and its drivers.
DATABASE_ERRORS = (SQLAlchemyError, Unavailable, OSError)


async def retrying(operation: Callable[[], Awaitable[T]], what: str) -> T | None:
    """Await `operation()` until it succeeds; None when it found its row already there.

    An `IntegrityError` means an earlier try did commit (the connection went before its answer):
    the record is in, nothing more to do.
    """
    failures = 0
    while True:
        try:
            return await operation()
        except IntegrityError:
            return None
        except DATABASE_ERRORS as error:
            failures += 1
            if failures == 1:
                log.warning("%s: the database is unavailable, trying again: %s", what, error)
            await asyncio.sleep(capped_exponential(0.1, 2.0, failures - 1))
