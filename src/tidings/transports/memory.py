"""The in-memory transport: one process, no durability. The executable spec of the port.

`memory://` names a broker shared by every transport made from that URL in this process, so two
`Bus` objects made with `transport="memory://"` talk to each other; `memory://other` is a separate
system. Nothing survives the process.

Time: a delayed message (a retry's delay, or a `not_before`, whose wait is measured from the wall
clock, as the sender stamped it) comes due once that long has passed on the event loop's clock. A
transport given `clock=` (a callable returning an aware `datetime`) keeps due times on that clock
instead, so a test can move time on (`tidings.testing`); after moving it, `MemoryBroker.wake()`
makes waiting receivers look again at once. Transports that share a broker should share a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from tidings.envelope import Envelope
from tidings.errors import NoRoute, TransportClosed
from tidings.headers import strip_fault_headers
from tidings.transports.base import DeadLetter, Delivery, Transport, error_queue_of

__all__ = ["MemoryBroker", "MemoryTransport"]

_sequence = itertools.count()


@dataclass(slots=True)
class _Stored:
    headers: Mapping[str, str]
    body: bytes
    order: int = field(default_factory=lambda: next(_sequence))
    delivery_count: int = 0


@dataclass(slots=True)
class _Queue:
    ready: deque[_Stored] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Stored]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: _Stored, visible_at: float = 0.0) -> None:
        if visible_at > 0:
            heapq.heappush(self.delayed, (visible_at, item.order, item))
        else:
            self.ready.append(item)
        self.changed.set()

    def put_back(self, item: _Stored) -> None:
        # Released messages go to the front: they were the oldest when they were taken.
        self.ready.appendleft(item)
        self.changed.set()

    def take(self, now: float) -> _Stored | None:
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])
        return self.ready.popleft() if self.ready else None

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None


class MemoryBroker:
    """The shared state behind `memory://` transports: queues, bindings, error queues."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, set[str]] = {}

    def queue(self, name: str) -> _Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise NoRoute(f"no queue {name!r}") from None

    def wake(self) -> None:
        """Make every waiting receiver look at its queue again (the clock was moved on)."""
        for queue in self.queues.values():
            queue.changed.set()


_brokers: dict[str, MemoryBroker] = {}


class _MemoryDelivery(Delivery):
    def __init__(self, transport: MemoryTransport, queue: str, item: _Stored) -> None:
        self.headers = item.headers
        self.body = item.body
        self.delivery_count = item.delivery_count
        self._transport = transport
        self._queue = queue
        self._item = item
        self._settled = False

    def _settle(self) -> _Queue | None:
        """The queue, the first time; None when settled before (a second settle does nothing)."""
        if self._settled:
            return None
        self._settled = True
        self._transport._unsettled.pop(id(self), None)
        queue = self._transport.broker.queue(self._queue)
        queue.changed.set()  # a receiver waiting for room under its prefetch may go on
        return queue

    async def ack(self) -> None:
        self._settle()

    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        if (queue := self._settle()) is not None:
            queue.put(_Stored(dict(headers), self.body), self._transport._now() + delay if delay > 0 else 0.0)

    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        if self._settle() is not None:
            self._transport.broker.queue(error_queue_of(self._queue)).put(_Stored(dict(headers), self.body))

    async def release(self) -> None:
        if (queue := self._settle()) is not None:
            queue.put_back(self._item)


class MemoryTransport(Transport):
    """A transport whose queues live in this process's memory."""

    #: Nothing is prefetched beyond what was yielded: closing a receiver gives nothing back.
    gives_back_uncounted = True

    def __init__(
        self,
        broker: MemoryBroker | None = None,
        *,
        url: str = "memory://",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.broker = broker if broker is not None else MemoryBroker()
        self.url = url
        self._clock = clock
        self._open = False
        self._temporary: set[str] = set()
        self._unsettled: dict[int, _MemoryDelivery] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryTransport:
        name = urlsplit(url).netloc
        broker = _brokers.setdefault(name, MemoryBroker())
        return cls(broker, url=url)

    def _check(self) -> None:
        if not self._open:
            raise TransportClosed(f"{self.url} is not open")

    def _now(self) -> float:
        """Seconds on the clock due times are kept in: the given clock's, else the event loop's."""
        if self._clock is not None:
            return self._clock().timestamp()
        return asyncio.get_running_loop().time()

    def _visible_at(self, not_before: datetime | None) -> float:
        if not_before is None:
            return 0.0
        # Measured from the wall clock, which the sender stamped `not_before` from, whatever clock
        # the due time is then kept on.
        wait = (not_before - datetime.now(UTC)).total_seconds()
        return self._now() + wait if wait > 0 else 0.0

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # Like a dropped connection: what this instance held unsettled goes back to its queue.
        for delivery in list(self._unsettled.values()):
            await delivery.release()
        for queue in self._temporary:
            self.broker.queues.pop(queue, None)
            self.broker.queues.pop(error_queue_of(queue), None)
        self._temporary.clear()

    async def declare_queue(self, queue: str, *, temporary: bool = False) -> None:
        self._check()
        self.broker.queues.setdefault(queue, _Queue())
        self.broker.queues.setdefault(error_queue_of(queue), _Queue())
        if temporary:
            self._temporary.add(queue)

    async def bind(self, queue: str, event_type: str) -> None:
        self._check()
        self.broker.queue(queue)
        self.broker.bindings.setdefault(event_type, set()).add(queue)

    async def unbind(self, queue: str, event_type: str) -> None:
        self._check()
        self.broker.bindings.get(event_type, set()).discard(queue)

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        self._check()
        headers = envelope.to_headers()
        visible_at = self._visible_at(not_before)
        for queue in sorted(self.broker.bindings.get(envelope.type, ())):
            if queue in self.broker.queues:
                self.broker.queues[queue].put(_Stored(headers, envelope.body), visible_at)

    async def send(self, envelope: Envelope, queue: str, *, not_before: datetime | None = None) -> None:
        self._check()
        self.broker.queue(queue).put(
            _Stored(envelope.to_headers(), envelope.body), self._visible_at(not_before)
        )

    async def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        self._check()
        state = self.broker.queue(queue)
        mine: set[int] = set()
        # Nothing is buffered here beyond what was yielded, so closing the iterator returns nothing.
        while True:
            self._check()
            mine &= self._unsettled.keys()
            has_room = len(mine) < prefetch
            item = state.take(self._now()) if has_room else None
            if item is None:
                await self._wait(state, has_room=has_room)
                continue
            item.delivery_count += 1
            delivery = _MemoryDelivery(self, queue, item)
            self._unsettled[id(delivery)] = delivery
            mine.add(id(delivery))
            yield delivery

    async def _wait(self, state: _Queue, *, has_room: bool) -> None:
        state.changed.clear()
        due = state.next_due()
        # Woken by a put or a settle; the timeout covers delayed messages coming due and close().
        timeout = min(0.5, max(0.0, due - self._now())) if (due is not None and has_room) else 0.5
        # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives just as the
        # event is set (a settle), and the cancelled receiver would then never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await state.changed.wait()

    async def dead_letters(self, queue: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        self._check()
        items = list(self.broker.queue(error_queue_of(queue)).ready)[:limit]
        return [DeadLetter(i.headers.get("id", ""), i.headers, i.body) for i in items]

    async def replay(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        self._check()
        errors = self.broker.queue(error_queue_of(queue))
        target = self.broker.queue(queue)
        wanted = None if message_ids is None else set(message_ids)
        keep: deque[_Stored] = deque()
        moved = 0
        for item in errors.ready:
            if wanted is None or item.headers.get("id") in wanted:
                target.put(_Stored(strip_fault_headers(item.headers), item.body))
                moved += 1
            else:
                keep.append(item)
        errors.ready = keep
        return moved

    async def purge_dead_letters(self, queue: str) -> int:
        self._check()
        errors = self.broker.queue(error_queue_of(queue))
        count = len(errors.ready)
        errors.ready.clear()
        return count
