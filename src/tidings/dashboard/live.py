"""`Live`: tells the open pages that something new arrived (server-sent events, `/events`).

Ingestion calls `publish(kind, ...)`; each open page's event stream is a subscriber with a small
queue of its own. A page that does not keep up loses events rather than hold anything back: an
event only says "look again", so the next one brings it up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["Live"]

_QUEUE_SIZE = 64


class Live:
    """The event streams of the pages open now."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[str | None]] = set()

    def publish(self, kind: str, **data: Any) -> None:
        """Tell every open page: `kind` is `message`, `heartbeat` or `failed`."""
        text = f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(text)

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    async def stream(self, *, keepalive: float = 15.0) -> AsyncIterator[str]:
        """One page's events as server-sent-event text, with a comment now and then to keep it open."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(_QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    async with asyncio.timeout(keepalive):
                        text = await queue.get()
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if text is None:
                    return
                yield text
        finally:
            self._subscribers.discard(queue)
