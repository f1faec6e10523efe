"""A robust connection to several nodes of a cluster: after losing one it goes to the next.

aio-pika's robust connection reconnects to the one URL it was made with; `connect_robust` takes
no list of hosts. aio-pika reads the connection's `url` afresh at every connection attempt, and
calls `_on_connection_close` both when an established connection is lost and when an attempt
fails; `FailoverConnection` moves `url` on to the next node there. So a node that dies is
replaced by the next one in the list at the next attempt (at once after a loss, then every
`reconnect_interval`), round the list for as long as it takes, and the channels, prefetch and
consumers aio-pika restores come back on whichever node answered.

The first connection is the transport's: it tries the nodes in order and keeps the first that
answers (`FailoverConnection(urls, first=i)` starts the rotation there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aio_pika
from yarl import URL

from tidings.logs import logger
from tidings.transports.urls import redact_url

__all__ = ["FailoverConnection"]

log = logger("tidings.transports.rabbitmq")


class FailoverConnection(aio_pika.RobustConnection):
    """A `RobustConnection` over `urls` (one per node), starting with `urls[first]`."""

    def __init__(self, urls: Sequence[str], *, first: int = 0, **kwargs: Any) -> None:
        self._urls = tuple(URL(url) for url in urls)
        self._current = first % len(self._urls)
        super().__init__(self._urls[self._current], **kwargs)

    @property
    def node(self) -> str:
        """The node connected to (or tried next), its password hidden."""
        return redact_url(str(self._urls[self._current]))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        if len(self._urls) > 1 and not getattr(self, "_close_called", False):
            # Before the next attempt reads `url`: that attempt goes to the next node.
            lost = self.node
            self._current = (self._current + 1) % len(self._urls)
            self.url = self._urls[self._current]
            if self.connection_attempt:  # not while the transport's first connection is made
                log.info("%s: connection lost or refused; the next attempt goes to %s", lost, self.node)
