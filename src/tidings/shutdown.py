"""Work that a stopping bus lets finish rather than cut off half-way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["finish_then_cancel"]

_T = TypeVar("_T")


async def finish_then_cancel(work: Coroutine[Any, Any, _T], *, grace: float | None = None) -> _T:
    """Await `work`; if cancelled meanwhile, let it finish first (at most `grace` seconds more,
    then it is cancelled too), and pass the cancellation on.

    A database round cut off between two statements leaves rows leased to nobody, or a driver's
    thread answering an event loop that may be gone by then.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, grace)
        raise
