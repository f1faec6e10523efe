"""The consumer loop: pull deliveries from a queue and run each through the pipeline.

At most `concurrency` messages are in a handler at once. A slot is taken *before* the next delivery
is pulled, so a cancelled loop never holds a delivery that no task will settle, and with
concurrency 1 messages are handled one after the other in queue order.

Redelivered messages are handled alone (`isolate_redeliveries`). A message that comes back
unsettled (`delivery_count` above 1) may be one on which a process died; if this process dies on it
too, every message it held unsettled goes back with its count raised, and a good message that sat
next to a poison one in `prefetch` would reach the delivery limit with it. So such a message waits
until the handlers in flight have finished, and nothing else starts until it is settled. Where the
transport gives back uncounted (`Transport.gives_back_uncounted`: SQLite, memory), everything
prefetched goes back to the queue too, so it is handled with nothing else unsettled, and the loop
then takes one message at a time until a first delivery (`delivery_count` 1) comes, and widens to
`prefetch` and `concurrency` again. RabbitMQ counts a message given back as delivered once more (a
nack before 4.3, `x-acquired-count` always): there the prefetched messages stay, not started, and
count once more only if the process dies. A loop starts in the careful state (one at a time),
because after a death the queue's head is that process's messages. What a death costs then falls
on the messages being handled, not on their neighbours (docs/guarantees.md says what is left).

Stopping (the loop is cancelled): no new delivery is taken; the handlers in flight get `grace`
seconds to finish and settle their messages (cut short when `hurry` is set: a second signal).
Those still running then are cancelled and their deliveries released, so another instance gets
them at once; a handler that finished is never run again because of the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from tidings.logs import logger
from tidings.stats import Stats
from tidings.transports.base import Delivery, Transport

__all__ = ["consume"]

log = logger("tidings.consumer")


async def consume(
    transport: Transport,
    queue: str,
    process: Callable[[Delivery, str], Coroutine[Any, Any, None]],
    *,
    concurrency: int,
    prefetch: int,
    grace: float | None = None,
    hurry: asyncio.Event | None = None,
    isolate_redeliveries: bool = True,
    stats: Stats | None = None,
) -> None:
    """Consume `queue` until cancelled; then let the in-flight handlers finish and settle.

    `stats.released` counts the handlers cut off at the end of the grace, their messages released.
    """
    slots = asyncio.Semaphore(concurrency)
    in_flight: dict[asyncio.Task[None], Delivery] = {}

    def done(task: asyncio.Task[None]) -> None:
        in_flight.pop(task, None)
        slots.release()

    def start(handling: Coroutine[Any, Any, None], delivery: Delivery) -> asyncio.Task[None]:
        task = asyncio.create_task(handling)
        in_flight[task] = delivery
        task.add_done_callback(done)
        return task

    careful = isolate_redeliveries
    deliveries: AsyncIterator[Delivery] | None = transport.receive(queue, prefetch=1 if careful else prefetch)
    try:
        while True:
            await slots.acquire()
            try:
                if deliveries is None:
                    deliveries = transport.receive(queue, prefetch=1)
                delivery = await anext(deliveries)
            except BaseException:
                slots.release()
                raise
            if not isolate_redeliveries:
                start(process(delivery, queue), delivery)
            elif delivery.delivery_count > 1:
                if not careful and transport.gives_back_uncounted:
                    # What this receiver prefetched goes back, uncounted, and nothing more is
                    # taken until this one is settled.
                    await _close(deliveries)
                    deliveries, careful = None, True
                # Otherwise what was prefetched stays, not started: given back, each of those
                # messages would come again counted once more, and after a failover instances
                # taking turns giving back the same redelivered messages pushed them to the
                # delivery limit. Either way this one runs alone, after the handlers in flight.
                # Started at once, so that a shutdown meanwhile finds it in flight (and releases it).
                alone = start(_after(set(in_flight), process, delivery, queue), delivery)
                await asyncio.wait({alone})
            elif careful:
                # A first delivery: back to the full prefetch and concurrency. The careful receiver
                # holds nothing else (prefetch 1), so closing it gives nothing back.
                if prefetch > 1:
                    await _close(deliveries)
                    deliveries = transport.receive(queue, prefetch=prefetch)
                careful = False
                start(process(delivery, queue), delivery)
            else:
                start(process(delivery, queue), delivery)
    finally:
        # Stopping: take no new message, but finish (and so settle) the ones being handled.
        if in_flight:
            released = await asyncio.shield(_drain(dict(in_flight), queue, grace, hurry))
            if stats is not None:
                stats.released += released
        if deliveries is not None:
            # Closing the iterator hands back what the transport prefetched but never yielded.
            await _close(deliveries)


async def _after(
    others: set[asyncio.Task[None]],
    process: Callable[[Delivery, str], Coroutine[Any, Any, None]],
    delivery: Delivery,
    queue: str,
) -> None:
    """Handle `delivery` once the handlers in `others` have finished: alone."""
    if others:
        await asyncio.wait(others)
    await process(delivery, queue)


async def _close(deliveries: AsyncIterator[Delivery]) -> None:
    close = getattr(deliveries, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _drain(
    in_flight: dict[asyncio.Task[None], Delivery],
    queue: str,
    grace: float | None,
    hurry: asyncio.Event | None,
) -> int:
    """Wait for the handlers in flight (at most `grace` s, or until `hurry`); release the rest.

    Returns how many were released."""
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
        return 0
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
    return len(late)
