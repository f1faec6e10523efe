"""The transport port: the narrow interface to whatever moves the bytes.

A transport knows queues, event bindings and deliveries; nothing else. Retries, the inbox, the
outbox, request/reply and sagas are written once above it and work on every transport.

The contract (every implementation passes `tests/conformance/`):

- `declare_queue(q)` creates queue `q` and its error queue `q + ".error"` if they do not exist.
  It is idempotent. A `temporary` queue belongs to this transport instance: it may vanish when the
  instance closes (request/reply uses one per bus instance).
- `bind(q, t)` makes every event of wire name `t` published afterwards land in `q`; `unbind` undoes
  it. Binding twice is the same as binding once.
- `publish(envelope)` copies the event into every queue bound to `envelope.type` (none is fine).
  `send(envelope, q)` puts a command or reply into queue `q`; `NoRoute` if `q` was never declared.
  Both return only once the message is durable as far as this transport can make it (confirmed by
  the broker, committed to disk); they raise a `TransportError` otherwise. `not_before` (aware
  datetime) holds the message back until then, durably.
- `receive(q, prefetch=n)` yields deliveries from `q`, at most `n` unsettled at once, oldest first.
  Several receivers of one queue (in one process or many) compete: each message goes to one of them.
  When the iterator is closed, deliveries it held but never yielded go back to the queue.
- A delivery is settled exactly once: `ack` (done), `retry_later` (back on its queue with new
  headers after a delay, counted as a new delivery), `dead_letter` (to the error queue with new
  headers) or `release` (back on the queue now, unhandled); settling it again does nothing (a
  shutdown releases what it cut off without knowing whether it settled). A delivery that is never
  settled (the process died) comes back after the transport's visibility timeout or connection
  loss, with `delivery_count` increased.
- Dead letters can be listed, replayed onto their queue with their original id, and purged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from tidings.envelope import Envelope

__all__ = ["DeadLetter", "Delivery", "Transport", "error_queue_of"]


def error_queue_of(queue: str) -> str:
    """The name of a queue's error (dead-letter) queue."""
    return f"{queue}.error"


class Delivery(ABC):
    """One message handed to a consumer. Settle it exactly once."""

    #: The flat header map (see `tidings.envelope`): CloudEvents attributes plus headers.
    headers: Mapping[str, str]
    body: bytes
    #: How many times this message has been handed to a consumer, this time included (1 = first).
    delivery_count: int

    @abstractmethod
    async def ack(self) -> None:
        """The message is done with: remove it."""

    @abstractmethod
    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        """Put the message back on its queue with `headers`, not visible before `delay` seconds."""

    @abstractmethod
    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        """Move the message to its queue's error queue, with `headers` (the fault attached)."""

    @abstractmethod
    async def release(self) -> None:
        """Give the message back unhandled, visible again at once (shutdown, infrastructure error)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in an error queue."""

    message_id: str
    headers: Mapping[str, str]
    body: bytes


class Transport(ABC):
    """The port every transport implements. Use it as an async context manager or open/close."""

    #: The URL this transport was made from, credentials redacted (for messages and logs).
    url: str = ""
    #: Whether closing a receiver gives back what it prefetched without counting those messages
    #: as delivered once more. The consumer loop gives prefetched messages back around a
    #: redelivered one only then (`tidings.consumer`); otherwise it keeps them, not started.
    gives_back_uncounted: bool = False

    @property
    def in_outage(self) -> bool:
        """Whether the transport knows it lost its broker and has logged that outage itself.

        The parts that fail meanwhile (the relay, a handler's send) then log at INFO: the outage
        is one WARNING, the transport's, however many parts it stops.
        """
        return False

    @abstractmethod
    async def open(self) -> None:
        """Connect. Raises `ConnectionFailed` naming the (redacted) URL."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect. Unsettled deliveries go back to their queues. Idempotent."""

    @abstractmethod
    async def declare_queue(self, queue: str, *, temporary: bool = False) -> None:
        """Create `queue` and its error queue if missing."""

    @abstractmethod
    async def bind(self, queue: str, event_type: str) -> None:
        """Route events of wire name `event_type` to `queue`."""

    @abstractmethod
    async def unbind(self, queue: str, event_type: str) -> None:
        """Stop routing events of wire name `event_type` to `queue`."""

    @abstractmethod
    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        """Copy an event into every queue bound to its type; return once durable."""

    @abstractmethod
    async def send(self, envelope: Envelope, queue: str, *, not_before: datetime | None = None) -> None:
        """Put a command or reply into `queue`; `NoRoute` if no such queue; return once durable."""

    @abstractmethod
    def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        """Yield deliveries from `queue`, at most `prefetch` unsettled at a time."""

    @abstractmethod
    async def dead_letters(self, queue: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        """The messages in `queue`'s error queue, oldest first, without removing them."""

    @abstractmethod
    async def replay(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        """Move dead letters (all, or those ids) back onto `queue`; returns how many moved.

        A replayed message keeps its id, body and headers, less the fault and attempt headers.
        """

    @abstractmethod
    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every message in `queue`'s error queue; returns how many."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
