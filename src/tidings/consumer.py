"""The consumer loop: pull deliveries from a queue and run each through the pipeline.

At most `concurrency` messages are in a handler at once. A slot is taken *before* the next delivery
is pulled, so a cancelled loop never holds a delivery that no task will settle, and with
concurrency 1 messages are handled one after the other in queue order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from tidings.transports.base import Delivery, Transport

__all__ = ["consume"]


async def consume(
    transport: Transport,
    queue: str,
    process: Callable[[Delivery, str], Coroutine[Any, Any, None]],
    *,
    concurrency: int,
    prefetch: int,
) -> None:
    """Consume `queue` until cancelled; then let the in-flight handlers finish and settle."""
    slots = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task[None]] = set()

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        slots.release()

    deliveries = transport.receive(queue, prefetch=prefetch)
    try:
        while True:
            await slots.acquire()
            try:
                delivery = await anext(deliveries)
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(process(delivery, queue))
            in_flight.add(task)
            task.add_done_callback(done)
    finally:
        # Stopping: take no new message, but finish (and so settle) the ones being handled.
        if in_flight:
            await asyncio.shield(asyncio.gather(*in_flight, return_exceptions=True))
        close = getattr(deliveries, "aclose", None)
        if close is not None:
            # Closing the iterator hands back what the transport prefetched but never yielded.
            with contextlib.suppress(Exception):
                await close()
