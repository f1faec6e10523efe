"""The consumer loop: pull deliveries from a queue and run each through the pipeline.

At most `concurrency` messages are in a handler at once. A slot is taken *before* the next delivery
is pulled, so a cancelled loop never holds a delivery that no task will settle, and with
concurrency 1 messages are handled one after the other in queue order.

Stopping (the loop is cancelled): no new delivery is taken; the handlers in flight get `grace`
seconds to finish and settle their messages (cut short when `hurry` is set: a second signal).
Those still running then are cancelled and their deliveries released, so another instance gets
them at once; a handler that finished is never run again because of the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from tidings.transports.base import Delivery, Transport

__all__ = ["consume"]

log = logging.getLogger("tidings.consumer")


async def consume(
    transport: Transport,
    queue: str,
    process: Callable[[Delivery, str], Coroutine[Any, Any, None]],
    *,
    concurrency: int,
    prefetch: int,
    grace: float | None = None,
    hurry: asyncio.Event | None = None,
) -> None:
    """Consume `queue` until cancelled; then let the in-flight handlers finish and settle."""
    slots = asyncio.Semaphore(concurrency)
    in_flight: dict[asyncio.Task[None], Delivery] = {}

    def done(task: asyncio.Task[None]) -> None:
        in_flight.pop(task, None)
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
            in_flight[task] = delivery
            task.add_done_callback(done)
    finally:
        # Stopping: take no new message, but finish (and so settle) the ones being handled.
        if in_flight:
            await asyncio.shield(_drain(dict(in_flight), queue, grace, hurry))
        close = getattr(deliveries, "aclose", None)
        if close is not None:
            # Closing the iterator hands back what the transport prefetched but never yielded.
            with contextlib.suppress(Exception):
                await close()


async def _drain(
    in_flight: dict[asyncio.Task[None], Delivery],
    queue: str,
    grace: float | None,
    hurry: asyncio.Event | None,
) -> None:
    """Wait for the handlers in flight (at most `grace` s, or until `hurry`); release the rest."""
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(set(in_flight), timeout=grace))}
    if hurry is not None:
        waiters.add(asyncio.ensure_future(hurry.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    late = [task for task in in_flight if not task.done()]
    if not late:
        return
    log.warning(
        "%s: %d handler(s) still running at the end of the shutdown grace: cancelled", queue, len(late)
    )
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for task in late:
        # Unsettled (or settled as it was cut off: a second settle is a no-op on every transport).
        with contextlib.suppress(Exception):
            await in_flight[task].release()
