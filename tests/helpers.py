"""Small helpers the tests share: waiting for a condition, running buses in the background."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from tidings import Bus


async def eventually(condition: Callable[[], bool], *, timeout: float = 15.0) -> None:
    """Wait until `condition()` holds; fail the test when it still does not after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(*buses: Bus) -> AsyncIterator[None]:
    """Start the buses, consume in the background, and stop and close them afterwards."""
    for bus in buses:
        await bus.start()
    tasks = [asyncio.create_task(bus.run()) for bus in buses]
    try:
        yield
    finally:
        for bus in buses:
            bus.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()
