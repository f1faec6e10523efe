"""What a harness sees of a bus's traffic: a transport decorator that records and keeps count.

`RecordingTransport` wraps the transport the bus under test really uses (a private memory broker,
or a real one) and passes every call on. On the way it

- records what the bus publishes and sends (`Outgoing`) and how it settles each delivery from its
  queue (`Delivered`);
- declares, on the first send to it, a queue nobody declared: the queue of another service, which
  does not run in the test. The message is captured there instead of failing with `NoRoute`;
- keeps count, in `Traffic`, of what is in flight: every message on its way into a queue that is
  consumed in the test (the bus's queue, the reply queues) with the time it comes due, every
  delivery not settled yet, every publish or send under way. A message is counted *before* it is
  handed to the transport and a delivery uncounted only *after* its settle returned, so from a
  send to the end of the handling it causes there is no moment at which nothing is counted: that
  is what lets `Harness.idle()` trust a quiet moment.

Counting needs nothing from the transport beyond the port, so it works the same on RabbitMQ or
SQLite as on the memory broker. It sees only traffic that passes through it: a message put into the
bus's queue by a process outside the test is not counted (it is handled, but `idle()` does not
wait for it).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

from tidings.audit import HEARTBEAT_TYPE
from tidings.envelope import Envelope, decode_body
from tidings.messages import Message, wire_name_of
from tidings.transports.base import DeadLetter, Delivery, Transport

__all__ = ["Delivered", "Outcome", "Outgoing", "RecordingTransport", "Traffic"]

M = TypeVar("M", bound=Message)

#: How the bus settled a delivery.
Outcome = Literal["acked", "retried", "dead-lettered", "released"]


def _decode(headers: Mapping[str, str], body: bytes, message_type: type[M]) -> M:
    envelope = Envelope.from_headers(headers, body)
    return message_type.model_validate(decode_body(envelope))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the bus under test published or sent, as the transport took it."""

    envelope: Envelope
    #: The queue it was sent to (a service's, or a requester's reply queue); None: published.
    queue: str | None
    #: Held back until then (a scheduled message), if it was.
    not_before: datetime | None = None

    @property
    def wire_name(self) -> str:
        return self.envelope.type

    @property
    def published(self) -> bool:
        return self.queue is None

    def is_a(self, message_type: type[Message]) -> bool:
        return self.envelope.type == wire_name_of(message_type)

    def message(self, message_type: type[M]) -> M:
        """The message, read back as `message_type` (a `DecodeError` or `ValidationError` if not one)."""
        return _decode(self.envelope.to_headers(), self.envelope.body, message_type)


@dataclass(frozen=True, slots=True)
class Delivered:
    """A delivery from the bus's own queue, and how the bus settled it."""

    headers: Mapping[str, str]
    body: bytes
    #: The transport's count: 1 the first time it was handed out.
    delivery_count: int
    outcome: Outcome
    #: For `retried`: the delay the bus asked for, in seconds (before the harness scaled it).
    delay: float | None = None
    #: For `retried` and `dead-lettered`: the headers it went with (the fault, the next round).
    settled_headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def wire_name(self) -> str:
        """The `type` header ("" when the input had none)."""
        return self.headers.get("type", "")

    @property
    def message_id(self) -> str:
        return self.headers.get("id", "")

    @property
    def envelope(self) -> Envelope:
        """The envelope as delivered (a `DecodeError` for input that was not one)."""
        return Envelope.from_headers(self.headers, self.body)

    def is_a(self, message_type: type[Message]) -> bool:
        return self.wire_name == wire_name_of(message_type)

    def message(self, message_type: type[M]) -> M:
        return _decode(self.headers, self.body, message_type)


class Traffic:
    """What a harness has recorded, and what is in flight (see the module docstring)."""

    def __init__(
        self, now: Callable[[], datetime], *, delay_factor: float = 1.0, wait_for_retries: bool = False
    ) -> None:
        self._now = now
        #: Every delay a delivery asks for (`retry_later`) is multiplied by this: 0 skips them.
        self.delay_factor = delay_factor
        #: Whether a message retried later is in flight while it waits (skipped or compressed
        #: delays), or held like a scheduled message until the clock gets there (delays kept).
        self.wait_for_retries = wait_for_retries
        self.outgoing: list[Outgoing] = []
        self.delivered: list[Delivered] = []
        #: The bus's own queue: its deliveries are recorded in `delivered`.
        self.watched: str | None = None
        #: Queues consumed in the test: messages on their way into them are in flight.
        self.consumed: set[str] = set()
        #: Queues declared through a recording transport, and which event types go to which queue.
        self.declared: set[str] = set()
        self.bindings: dict[str, set[str]] = {}
        # Per consumed queue, the messages on their way into it: (due time, in flight before then).
        self._due: dict[str, list[tuple[float, bool]]] = {}
        self._unsettled: dict[int, str] = {}
        self._operations = 0
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now().timestamp()

    def due_at(self, not_before: datetime | None) -> float:
        """When a message held back until `not_before` comes due on the clock: the wait is measured
        from the wall clock, which the sender stamped it from (as the memory transport does)."""
        if not_before is None:
            return self.now()
        return self.now() + max(0.0, (not_before - datetime.now(UTC)).total_seconds())

    # -- counting ------------------------------------------------------------------------------

    def expect(self, queue: str, due: float, *, early: bool = False) -> bool:
        """A message is on its way into `queue`, visible from `due`: counted if `queue` is consumed.

        `early`: in flight before it is due too (a retry whose delay is skipped or compressed).
        """
        if queue not in self.consumed:
            return False
        bisect.insort(self._due.setdefault(queue, []), (due, early))
        self._change()
        return True

    def forget(self, queue: str, due: float, *, early: bool = False) -> None:
        """A message counted by `expect` never got there (its send failed)."""
        waiting = self._due.get(queue, [])
        if (due, early) in waiting:
            waiting.remove((due, early))
            self._change()

    def taken(self, queue: str, delivery: Delivery) -> None:
        """A delivery was handed out: one message of the queue is now being handled."""
        waiting = self._due.get(queue)
        if waiting:
            # The earliest due is the one the transport hands out first; one out of the count is
            # what matters, not which.
            waiting.pop(0)
        self._unsettled[id(delivery)] = queue
        self._change()

    def settled(self, delivery: Delivery) -> None:
        self._unsettled.pop(id(delivery), None)
        self._change()

    def begin(self) -> None:
        self._operations += 1
        self._change()

    def end(self) -> None:
        self._operations -= 1
        self._change()

    def record(self, outgoing: Outgoing) -> None:
        self.outgoing.append(outgoing)
        self._change()

    def record_delivery(self, delivered: Delivered) -> None:
        self.delivered.append(delivered)
        self._change()

    # -- reading -------------------------------------------------------------------------------

    def busy(self) -> list[str]:
        """What is in flight now, in words; empty when nothing is."""
        now = self.now()
        reasons = []
        if self._unsettled:
            reasons.append(f"{len(self._unsettled)} delivery(ies) not settled yet")
        for queue, waiting in sorted(self._due.items()):
            ready = sum(1 for due, early in waiting if due <= now)
            if ready:
                reasons.append(f"{ready} message(s) waiting in queue {queue!r}")
            retried = sum(1 for due, early in waiting if early and due > now)
            if retried:
                reasons.append(f"{retried} message(s) retried in {queue!r}, not due yet")
        if self._operations:
            reasons.append(f"{self._operations} publish/send call(s) under way")
        return reasons

    def scheduled(self) -> int:
        """Messages held back on their way into consumed queues until the clock gets there."""
        now = self.now()
        return sum(1 for waiting in self._due.values() for due, early in waiting if due > now and not early)

    async def changed(self, at_most: float) -> None:
        """Return after the next change, or after `at_most` seconds."""
        self._changed.clear()
        try:
            async with asyncio.timeout(at_most):
                await self._changed.wait()
        except TimeoutError:
            pass

    def _change(self) -> None:
        self._changed.set()


class RecordingTransport(Transport):
    """Passes every call on to `inner`, keeping count in `traffic`.

    With `record` (the bus under test's transport) it also records what is published and sent,
    and declares the queues of services that do not run in the test on the first send to them.
    Without (the harness's own client), it only keeps count.
    """

    def __init__(self, inner: Transport, traffic: Traffic, *, record: bool) -> None:
        self.inner = inner
        self.traffic = traffic
        self.record = record
        self.url = inner.url
        self.gives_back_uncounted = inner.gives_back_uncounted

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def declare_queue(self, queue: str, *, temporary: bool = False) -> None:
        await self.inner.declare_queue(queue, temporary=temporary)
        self.traffic.declared.add(queue)

    async def bind(self, queue: str, event_type: str) -> None:
        await self.inner.bind(queue, event_type)
        self.traffic.bindings.setdefault(event_type, set()).add(queue)

    async def unbind(self, queue: str, event_type: str) -> None:
        await self.inner.unbind(queue, event_type)
        self.traffic.bindings.get(event_type, set()).discard(queue)

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        if envelope.type == HEARTBEAT_TYPE:
            # The bus saying it is alive, not a message of the system under test: neither
            # recorded nor waited for (it comes every few seconds, however idle the bus is).
            await self.inner.publish(envelope, not_before=not_before)
            return
        traffic = self.traffic
        due = traffic.due_at(not_before)
        queues = [q for q in sorted(traffic.bindings.get(envelope.type, ())) if traffic.expect(q, due)]
        traffic.begin()
        try:
            await self.inner.publish(envelope, not_before=not_before)
        except BaseException:
            for queue in queues:
                traffic.forget(queue, due)
            raise
        finally:
            traffic.end()
        if self.record:
            traffic.record(Outgoing(envelope, None, not_before))

    async def send(self, envelope: Envelope, queue: str, *, not_before: datetime | None = None) -> None:
        traffic = self.traffic
        traffic.begin()
        try:
            if self.record and queue not in traffic.declared:
                # Another service's queue: it does not run here, so its queue keeps what it is sent.
                await self.declare_queue(queue)
            due = traffic.due_at(not_before)
            counted = traffic.expect(queue, due)
            try:
                await self.inner.send(envelope, queue, not_before=not_before)
            except BaseException:
                if counted:
                    traffic.forget(queue, due)
                raise
        finally:
            traffic.end()
        if self.record:
            traffic.record(Outgoing(envelope, queue, not_before))

    async def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        deliveries = self.inner.receive(queue, prefetch=prefetch)
        try:
            async for delivery in deliveries:
                watched = _Watched(delivery, queue, self.traffic)
                self.traffic.taken(queue, watched)
                yield watched
        finally:
            # Closing this iterator closes the transport's: it hands back what it prefetched.
            close = getattr(deliveries, "aclose", None)
            if close is not None:
                await close()

    async def dead_letters(self, queue: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        return await self.inner.dead_letters(queue, limit=limit)

    async def replay(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        traffic = self.traffic
        # Counted before they move (a receiver may take them before `replay` returns): as many as
        # the error queue holds of those asked for; the count is corrected by what really moved.
        letters = await self.inner.dead_letters(queue, limit=1_000_000)
        wanted = None if message_ids is None else set(message_ids)
        expected = sum(1 for letter in letters if wanted is None or letter.message_id in wanted)
        due = traffic.now()
        for _ in range(expected):
            traffic.expect(queue, due)
        moved = 0
        try:
            moved = await self.inner.replay(queue, message_ids)
        finally:
            for _ in range(max(0, expected - moved)):
                traffic.forget(queue, due)
        return moved

    async def purge_dead_letters(self, queue: str) -> int:
        return await self.inner.purge_dead_letters(queue)


class _Watched(Delivery):
    """A delivery passed on to the consumer; counted until its first settle returned."""

    def __init__(self, inner: Delivery, queue: str, traffic: Traffic) -> None:
        self.headers = inner.headers
        self.body = inner.body
        self.delivery_count = inner.delivery_count
        self._inner = inner
        self._queue = queue
        self._traffic = traffic
        self._settled = False

    async def ack(self) -> None:
        if self._settled:
            await self._inner.ack()  # a second settle: the transport's no-op, nothing to count
            return
        await self._settle(self._inner.ack(), "acked", back_at=None)

    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        if self._settled:
            await self._inner.retry_later(delay, headers)
            return
        traffic = self._traffic
        scaled = delay * traffic.delay_factor
        await self._settle(
            self._inner.retry_later(scaled, headers),
            "retried",
            back_at=traffic.now() + scaled,
            early=traffic.wait_for_retries,
            delay=delay,
            headers=headers,
        )

    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        if self._settled:
            await self._inner.dead_letter(headers)
            return
        await self._settle(self._inner.dead_letter(headers), "dead-lettered", back_at=None, headers=headers)

    async def release(self) -> None:
        if self._settled:
            await self._inner.release()
            return
        await self._settle(self._inner.release(), "released", back_at=self._traffic.now())

    async def _settle(
        self,
        settling: Awaitable[None],
        outcome: Outcome,
        *,
        back_at: float | None,
        early: bool = False,
        delay: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        traffic = self._traffic
        self._settled = True
        # Counted before the transport has it back: it may be handed out again before this returns.
        counted = back_at is not None and traffic.expect(self._queue, back_at, early=early)
        try:
            await settling
        except BaseException:
            if counted and back_at is not None:
                traffic.forget(self._queue, back_at, early=early)
            # A settle that failed leaves the message with the transport, which brings it back
            # (visibility timeout, lost connection): in flight until then.
            traffic.expect(self._queue, traffic.now())
            traffic.settled(self)
            raise
        traffic.settled(self)
        if self._queue == traffic.watched:
            traffic.record_delivery(
                Delivered(self.headers, self.body, self.delivery_count, outcome, delay, dict(headers or {}))
            )
