"""The SQLite transport: the embedded default. Several processes on one machine share one file.

    sqlite:///shop.db                           shop.db in the working directory
    sqlite:////var/lib/shop/bus.db              an absolute path
    sqlite:///shop.db?visibility_timeout=2      seconds before a dead consumer's messages come back

Query parameters (all optional): `visibility_timeout` (seconds, default 30), `busy_timeout`
(seconds to wait for another process's write lock, default 5), `synchronous` (`normal`, the
default, or `full`), `max_poll_interval` (seconds, default 0.15).

Durability. The database runs in WAL mode with `synchronous=NORMAL`: a commit is appended to the
write-ahead log, which lives in the OS page cache until a checkpoint. So once `publish()` or
`send()` returned, the message survives kill -9 of any process (the kernel still has the pages);
only a power cut or an OS crash can lose the last commits. `synchronous=full` fsyncs every commit
and survives those too, at a cost of one fsync per batch.

Delivery. A consumer claims messages: each claimed row records the instance holding it and a
deadline (`visible_at`) the instance renews while it lives. A message whose holder died comes
back when the deadline passes, with `delivery_count` one higher. Publish order is claim order.
Temporary queues (a bus's reply queue) live on a lease the instance renews likewise; an instance
that stalled past it (and lost them to another transport's clean-up) declares them again.

Lock contention. While another process holds the write lock beyond `busy_timeout`, a publish,
send or declaration fails with `TransportError`; a receiver's claim waits (tried again with
backoff, logged once) for as long as it takes, so `receive()` and `Bus.run()` carry on once the
lock is free; a settle waits up to one visibility timeout, then gives its claim up, and the message
comes back after the visibility timeout (see `connection_thread`).

Speed. All SQL of one transport instance (the statements of `queries`, on the tables of `schema`)
runs on the one thread that owns its connection (`connection_thread`), which commits whatever
requests are waiting in one transaction (group commit); a claim takes up to `prefetch` rows at
once. A commit wakes receivers in the same process at once; for other processes' commits, that
thread polls `PRAGMA data_version` (cheap, no lock) every millisecond while messages flow, backing
off to `max_poll_interval` when idle, and wakes only receivers with something to claim. A message
held back or retried (by this process or another) is looked for when it comes due: the thread
knows when from its own claims and writes, and from its looks at other processes' commits.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

from tidings.envelope import Envelope
from tidings.errors import ConfigurationError, TransportClosed
from tidings.transports.base import DeadLetter, Delivery, Transport
from tidings.transports.sqlite import queries, schema
from tidings.transports.sqlite.connection_thread import ConnectionThread, listen, unlisten

__all__ = ["SQLiteSettings", "SQLiteTransport"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class SQLiteSettings:
    """Where the database is and how the transport uses it."""

    path: str
    visibility_timeout: float = 30.0
    busy_timeout: float = 5.0
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    max_poll_interval: float = 0.15

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigurationError("the SQLite transport needs a database path")
        for name in ("visibility_timeout", "busy_timeout", "max_poll_interval"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        if self.synchronous not in ("NORMAL", "FULL"):
            raise ConfigurationError("synchronous must be 'normal' or 'full'")

    @classmethod
    def from_url(cls, url: str) -> SQLiteSettings:
        """Read `sqlite:///relative.db` or `sqlite:////absolute.db`, with query parameters."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc:
            raise ConfigurationError(f"not a SQLite URL (sqlite:///path.db): {url!r}")
        # Like SQLAlchemy: the third slash ends the empty authority; a fourth starts a root path.
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        numbers = {"visibility_timeout", "busy_timeout", "max_poll_interval"}
        known = {f.name for f in fields(cls)} - {"path"}
        options: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known:
                raise ConfigurationError(
                    f"unknown SQLite URL parameter {key!r}; known: {', '.join(sorted(known))}"
                )
            try:
                options[key] = float(value) if key in numbers else value.upper()
            except ValueError:
                raise ConfigurationError(f"{key} must be a number of seconds, not {value!r}") from None
        return cls(path=path, **options)


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


class _Receiver:
    """The state of one `receive()` iterator."""

    __slots__ = ("claim_now", "prefetch", "prefetched", "queue", "room", "unsettled", "wake")

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        #: Claimed, not yet yielded (goes back to the queue when the iterator closes).
        self.prefetched: deque[schema.Row] = deque()
        self.unsettled = 0
        #: Set when the queue (may) have a visible message: by a commit in this process that
        #: filled it, by the connection thread seeing one (another process's commit, a message
        #: coming due), and by close().
        self.wake = asyncio.Event()
        #: Set by a settle (room under the prefetch again), and by close().
        self.room = asyncio.Event()
        #: Claim without waiting for a wake: at the start, and after a claim that took all it could
        #: (there may be more).
        self.claim_now = True


class _SQLiteDelivery(Delivery):
    __slots__ = ("_receiver", "_seq", "_settled", "_transport")

    def __init__(self, transport: SQLiteTransport, receiver: _Receiver, row: schema.Row) -> None:
        self.headers = row.headers
        self.body = row.body
        self.delivery_count = row.delivery_count
        self._transport = transport
        self._receiver = receiver
        self._seq = row.seq
        self._settled = False

    def _settling(self) -> bool:
        """Whether to settle now. Settling twice is a no-op, and so is settling after close():
        close() already gave the message back to its queue, where it will be delivered again."""
        if self._settled:
            return False
        self._settled = True
        self._receiver.unsettled -= 1
        self._receiver.room.set()
        return self._transport.is_open

    async def _settle(self, run: Callable[[schema.Batch], None]) -> None:
        if self._settling():
            await self._transport._submit(
                run, patience=self._transport.settings.visibility_timeout, claims=(self._seq,)
            )

    async def ack(self) -> None:
        # Like an AMQP ack, this returns without waiting for the commit (it shares the next one):
        # an ack lost to a crash means one more delivery, which at-least-once allows.
        if self._settling():
            self._transport._submit_nowait(
                partial(queries.ack, seq=self._seq, delivery_count=self.delivery_count),
                patience=self._transport.settings.visibility_timeout,
                claims=(self._seq,),
            )

    async def retry_later(self, delay: float, headers: Mapping[str, str]) -> None:
        await self._settle(
            partial(
                queries.retry_later,
                queue=self._receiver.queue,
                seq=self._seq,
                delivery_count=self.delivery_count,
                headers=json.dumps(dict(headers)),
                delay=delay,
            )
        )

    async def dead_letter(self, headers: Mapping[str, str]) -> None:
        await self._settle(
            partial(
                queries.dead_letter,
                queue=self._receiver.queue,
                seq=self._seq,
                delivery_count=self.delivery_count,
                headers=json.dumps(dict(headers)),
            )
        )

    async def release(self) -> None:
        rows = [(self._seq, self.delivery_count)]
        await self._settle(partial(queries.release, queue=self._receiver.queue, rows=rows, handed_out=True))


class SQLiteTransport(Transport):
    """A transport whose queues are tables in one SQLite file, shared by local processes."""

    #: Prefetched rows never handed out go back with their count taken back (`queries.release`).
    gives_back_uncounted = True

    def __init__(self, settings: SQLiteSettings, *, url: str | None = None) -> None:
        self.settings = settings
        self.url = url if url is not None else f"sqlite:///{settings.path}"
        # Receivers in this process are woken by path, so two spellings of one file must meet.
        self._path = os.path.realpath(settings.path)
        self._thread: ConnectionThread | None = None
        self._listener: int | None = None
        self._receivers: set[_Receiver] = set()
        self._waiting: set[_Receiver] = set()  # receivers waiting for a wake

    @classmethod
    def from_url(cls, url: str) -> SQLiteTransport:
        return cls(SQLiteSettings.from_url(url), url=url)

    @property
    def is_open(self) -> bool:
        return self._thread is not None

    def _submit(
        self,
        run: Callable[[schema.Batch], T],
        *,
        write: bool = True,
        patience: float = 0.0,
        claims: tuple[int, ...] = (),
    ) -> asyncio.Future[T]:
        if self._thread is None:
            raise TransportClosed(f"{self.url} is not open")
        return self._thread.submit(run, write=write, patience=patience, claims=claims)

    def _submit_nowait(
        self, run: Callable[[schema.Batch], None], *, patience: float, claims: tuple[int, ...]
    ) -> None:
        if self._thread is None:
            raise TransportClosed(f"{self.url} is not open")
        self._thread.submit_nowait(run, patience=patience, claims=claims)

    async def open(self) -> None:
        if self._thread is not None:
            return
        thread = ConnectionThread(
            # The real path, the one `listen` knows the receivers by: the thread wakes them by it
            # after its commits. Given `sqlite:///shop.db` as spelled, no local commit woke anyone.
            path=self._path,
            url=self.url,
            instance=uuid.uuid4().hex,
            lease=self.settings.visibility_timeout,
            busy_timeout=self.settings.busy_timeout,
            synchronous=self.settings.synchronous,
            max_poll_interval=self.settings.max_poll_interval,
            on_ready=self._wake_receivers,
        )
        await thread.start()
        self._thread = thread
        self._listener = listen(self._path, asyncio.get_running_loop(), self._wake_receivers)

    def _wake_receivers(self, queues: set[str]) -> None:
        for receiver in self._receivers:
            if receiver.queue in queues:
                receiver.wake.set()

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        # Submitted before the thread is marked closed, and run after everything already queued.
        prefetched = [
            (receiver.queue, row.seq, row.delivery_count)
            for receiver in self._receivers
            for row in receiver.prefetched
        ]
        closing = thread.submit(partial(queries.close_instance, prefetched=prefetched))
        self._thread = None
        if self._listener is not None:
            unlisten(self._path, self._listener)
            self._listener = None
        for receiver in self._receivers:
            receiver.prefetched.clear()
            # A receiver waiting for a message or for room raises TransportClosed now.
            receiver.wake.set()
            receiver.room.set()
        try:
            await closing
        finally:
            await thread.stop()

    async def declare_queue(self, queue: str, *, temporary: bool = False) -> None:
        await self._submit(partial(queries.declare_queue, queue=queue, temporary=temporary))

    async def bind(self, queue: str, event_type: str) -> None:
        await self._submit(partial(queries.bind, queue=queue, event_type=event_type))

    async def unbind(self, queue: str, event_type: str) -> None:
        await self._submit(partial(queries.unbind, queue=queue, event_type=event_type))

    async def publish(self, envelope: Envelope, *, not_before: datetime | None = None) -> None:
        await self._submit(
            partial(
                queries.publish,
                event_type=envelope.type,
                message_id=envelope.id,
                headers=json.dumps(envelope.to_headers()),
                body=envelope.body,
                not_before=_timestamp(not_before),
            )
        )

    async def send(self, envelope: Envelope, queue: str, *, not_before: datetime | None = None) -> None:
        await self._submit(
            partial(
                queries.send,
                queue=queue,
                message_id=envelope.id,
                headers=json.dumps(envelope.to_headers()),
                body=envelope.body,
                not_before=_timestamp(not_before),
            )
        )

    async def receive(self, queue: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        await self._submit(partial(queries.require_queue, queue=queue), write=False)
        receiver = _Receiver(queue, prefetch)
        self._receivers.add(receiver)
        try:
            while True:
                row = await self._next_row(receiver)
                receiver.unsettled += 1
                yield _SQLiteDelivery(self, receiver, row)
        finally:
            self._receivers.discard(receiver)
            self._waiting.discard(receiver)
            self._watch()
            if receiver.prefetched and self._thread is not None:
                rows = [(row.seq, row.delivery_count) for row in receiver.prefetched]
                receiver.prefetched.clear()
                # Submitted before awaiting: the rows go back even if this task is cancelled. Not
                # patient: a closing iterator must not hold up a shutdown while the database is
                # locked; if this fails, the claims are given up and the rows come back later.
                await self._submit(
                    partial(queries.release, queue=queue, rows=rows, handed_out=False),
                    claims=tuple(seq for seq, _ in rows),
                )

    def _watch(self) -> None:
        # Only receivers waiting for a wake need the thread to watch other processes' commits: a
        # busy one claims again by itself, and looks on its behalf would only take the GIL.
        if self._thread is not None:
            self._thread.watch(frozenset(receiver.queue for receiver in self._waiting))

    async def _next_row(self, receiver: _Receiver) -> schema.Row:
        """The next claimed row, once `receiver` has room under its prefetch."""
        while True:
            if self._thread is None:
                raise TransportClosed(f"{self.url} is closed")
            if receiver.prefetched:
                return receiver.prefetched.popleft()
            room = receiver.prefetch - receiver.unsettled
            if room <= 0:
                receiver.room.clear()
                await receiver.room.wait()
                continue
            if not receiver.claim_now:
                self._waiting.add(receiver)
                self._watch()
                try:
                    await receiver.wake.wait()
                finally:
                    self._waiting.discard(receiver)
                    self._watch()
            # Cleared before the claim, so that a wake during the claim is not lost.
            receiver.wake.clear()
            rows = await self._claim(receiver.queue, room)
            if self._thread is None:
                continue  # close() already gave these rows back
            receiver.prefetched.extend(rows)
            receiver.claim_now = len(rows) == room

    async def _claim(self, queue: str, room: int) -> list[schema.Row]:
        # Patient without limit: another process holding the write lock for long holds this
        # receiver up (it waits, tried again with backoff), it does not end it (nor `Bus.run()`).
        future = self._submit(partial(queries.claim, queue=queue, limit=room), patience=math.inf)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The claim runs anyway: give its rows back when it lands, or this live process
            # would hold (and keep renewing) them with nobody to handle them.
            future.add_done_callback(partial(self._give_back, queue))
            raise

    def _give_back(self, queue: str, future: asyncio.Future[list[schema.Row]]) -> None:
        if future.cancelled() or future.exception() is not None or self._thread is None:
            return
        rows = [(row.seq, row.delivery_count) for row in future.result()]
        if rows:
            self._submit_nowait(
                partial(queries.release, queue=queue, rows=rows, handed_out=False),
                patience=self.settings.visibility_timeout,
                claims=tuple(seq for seq, _ in rows),
            )

    async def dead_letters(self, queue: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        return await self._submit(partial(queries.dead_letters, queue=queue, limit=limit))

    async def replay(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        return await self._submit(partial(queries.replay, queue=queue, message_ids=message_ids))

    async def purge_dead_letters(self, queue: str) -> int:
        return await self._submit(partial(queries.purge_dead_letters, queue=queue))
