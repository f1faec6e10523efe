"""`ConnectionThread`: the one thread that owns a SQLite transport's connection, with group commit.

`SQLiteTransport` (`transport`) submits requests (functions of `queries` taking a `schema.Batch`)
from the event loop; this thread runs them and resolves their futures on the loop.

Why a thread of our own: stdlib `sqlite3` releases the GIL while SQLite works, and one connection
on one thread needs no locking. Why group commit: a commit costs far more than a row, so the thread
takes every request waiting in its inbox, runs them all in one transaction, commits once, and only
then resolves each caller's future. Concurrent publishes, claims and acks share commits that way.

The thread also renews, every lease/3, the claims its instance holds: a handler that runs longer
than the visibility timeout keeps its message, and so does one that blocks the event loop, since
the renewal does not need the loop. Only a dead (or frozen) process loses its claims. The renewal
also extends the lease on the instance's temporary queues; if it finds that lease gone (the whole
process stalled past it, and another transport deleted them as orphans), it declares them again,
so that a reply queue outlives a stall. After a stall the overdue renewal runs before anything else.

Another process holding the write lock beyond `busy_timeout`: publishes, sends and declarations
fail (`TransportError`), their callers decide; but claims and settles, which nobody upstream can do
anything useful with a failure of, wait it out. They are tried again with backoff (50 ms doubling
to 1 s; logged once per episode, and once when the lock is free again): a claim for as long as it
takes, a settle for one visibility timeout. A settle that fails for good gives up its claims (they
are no longer renewed), so the message comes back after the visibility timeout. Reads need no
write lock (WAL): one that shared its batch with writes that met the lock runs again on its own.

And it watches, for the queues its receivers wait on, what other processes commit: `PRAGMA
data_version` (a read of shared memory, no lock) says whether anyone else committed since the last
look; only then, or when a held-back or claimed message comes due, does it look at those queues,
and it wakes the receivers only of queues with a visible message. When a message comes due is known
from this instance's own claims (the first visible_at left in the queue) and writes (a message put
in a queue for later, a retry), and from the looks themselves for other processes' writes. It looks
every millisecond while messages flow and backs off to `max_poll_interval` when they stop. The
event loop is not woken for a look that finds nothing, so an idle consumer costs next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tidings.errors import ConnectionFailed, TidingsError, TransportClosed, TransportError
from tidings.logs import logger
from tidings.transports.sqlite import queries, schema

__all__ = ["ConnectionThread", "listen", "unlisten"]

log = logger("tidings.transports.sqlite")

T = TypeVar("T")

#: Requests run in one transaction, about at most (bundles are not split). Bounds the latency a
#: large batch adds to its callers.
MAX_BATCH = 2000
#: Waiting for another process's write lock: the first pause, doubling up to the last.
_FIRST_PAUSE = 0.0001
_LAST_PAUSE = 0.002
#: How often to look at other processes' commits while messages flow. Once none came for
#: `_BUSY_GRACE` seconds, each look that finds nothing doubles the interval, up to the maximum:
#: a stream with hiccups keeps its fast looks, an idle consumer backs off.
_MIN_POLL_INTERVAL = 0.001
_BUSY_GRACE = 0.2
#: Claims and settles that met the write lock held beyond busy_timeout are tried again after a
#: pause, the first doubling up to the last: contention is waited out without spinning on it.
_FIRST_BACKOFF = 0.05
_LAST_BACKOFF = 1.0


# -- waking receivers in this process -------------------------------------------------------------
# A commit that puts messages in queues wakes the receivers of those queues in this process at once;
# other processes' commits are noticed by the connection thread's looks (`ConnectionThread._look`).

_listeners_lock = threading.Lock()
_listeners: dict[str, dict[int, tuple[asyncio.AbstractEventLoop, Callable[[set[str]], None]]]] = {}
_listener_ids = itertools.count()


def listen(path: str, loop: asyncio.AbstractEventLoop, callback: Callable[[set[str]], None]) -> int:
    """Call `callback(queues)` on `loop` after any commit in this process that fills `queues`."""
    token = next(_listener_ids)
    with _listeners_lock:
        _listeners.setdefault(path, {})[token] = (loop, callback)
    return token


def unlisten(path: str, token: int) -> None:
    with _listeners_lock:
        _listeners.get(path, {}).pop(token, None)


def _notify(path: str, queues: set[str]) -> None:
    with _listeners_lock:
        targets = list(_listeners.get(path, {}).values())
    for loop, callback in targets:
        # RuntimeError: that loop is closed (its transport was never closed); nobody to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, queues)


# -- the thread -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Request(Generic[T]):
    run: Callable[[schema.Batch], T]
    #: None: nobody waits for the outcome (see `ConnectionThread.submit_nowait`).
    future: asyncio.Future[T] | None
    write: bool
    #: Until when (monotonic) the request is tried again while another process holds the write
    #: lock; 0: it fails after `busy_timeout` like any other.
    patient_until: float = 0.0
    #: The claims (seqs) this request settles: given up if it fails for good, so that they are no
    #: longer renewed and the messages come back after the visibility timeout.
    claims: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class _Stop:
    future: asyncio.Future[None]


def _deadline(patience: float) -> float:
    """`patience` seconds from now, monotonic (`math.inf` stays that)."""
    if patience <= 0:
        return 0.0
    return time.monotonic() + patience if math.isfinite(patience) else math.inf


def _is_busy(error: BaseException) -> bool:
    return getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")


def _translate(error: BaseException, where: str) -> BaseException:
    """A sqlite3 exception as the tidings error it means; anything else as it is."""
    if isinstance(error, TidingsError) or not isinstance(error, sqlite3.Error):
        return error
    if _is_busy(error):
        return TransportError(f"{where}: the database stayed locked by another process ({error})")
    return TransportError(f"{where}: {error}")


_Outcome = tuple["asyncio.Future[Any] | None", bool, Any]


def _resolve(outcomes: list[_Outcome]) -> None:
    for future, ok, value in outcomes:
        if future is None or future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class ConnectionThread:
    """Runs requests against one SQLite connection on a thread of its own."""

    def __init__(
        self,
        *,
        path: str,
        url: str,
        instance: str,
        lease: float,
        busy_timeout: float,
        synchronous: str,
        max_poll_interval: float,
        on_ready: Callable[[set[str]], None],
    ) -> None:
        self._path = path
        self._url = url
        self._instance = instance
        self._lease = lease
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._max_poll_interval = max_poll_interval
        self._on_ready = on_ready
        #: The queues receivers wait on (see `watch`): the thread only reads it, and a frozenset
        #: is replaced whole, never changed in place.
        self.watching: frozenset[str] = frozenset()
        self._inbox: queue.SimpleQueue[list[_Request[Any]] | _Stop] = queue.SimpleQueue()
        # Requests made during one turn of the event loop, handed to the thread together at the
        # next turn (see `_enqueue`).
        self._outbox: list[_Request[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        # The thread's own state: touched by the thread only.
        self._held: dict[int, int] = {}
        self._temporary: frozenset[str] = frozenset()  # the temporary queues this instance owns
        self._seen_version: int | None = None
        self._due: dict[str, float] = {}  # queue -> when a message becomes visible (wall clock)
        self._poll_interval = _MIN_POLL_INTERVAL
        self._next_poll = 0.0  # monotonic
        self._last_activity = 0.0  # monotonic
        # Waiting out another process's write lock: the requests to try again, when, the pause
        # after the next failure, and since when the database has been locked (None: it is not).
        self._retrying: list[_Request[Any]] = []
        self._retry_at = 0.0  # monotonic
        self._backoff = _FIRST_BACKOFF
        self._locked_since: float | None = None

    async def start(self) -> None:
        """Open the database (create the schema) on the new thread; `ConnectionFailed` if not."""
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()
        thread = threading.Thread(
            target=self._main, args=(started,), name=f"tidings-sqlite {self._path}", daemon=True
        )
        thread.start()
        await started

    def submit(
        self,
        run: Callable[[schema.Batch], T],
        *,
        write: bool = True,
        patience: float = 0.0,
        claims: tuple[int, ...] = (),
    ) -> asyncio.Future[T]:
        """Run `run(batch)` in the next transaction; the future resolves once it committed.

        While another process holds the write lock beyond busy_timeout, the request is tried again
        (with backoff) for `patience` seconds (`math.inf`: until it commits) before it fails. If it
        fails, the `claims` it settles are given up."""
        if self._loop is None or self._stopped:
            raise TransportClosed(f"{self._url} is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._enqueue(_Request(run, future, write, _deadline(patience), claims))
        return future

    def submit_nowait(
        self, run: Callable[[schema.Batch], None], *, patience: float = 0.0, claims: tuple[int, ...] = ()
    ) -> None:
        """Run `run(batch)` in the next transaction, without waiting for it: for acks, which AMQP
        does not confirm either. A failure is logged and its `claims` given up: the message then
        comes back after the visibility timeout (at least once)."""
        if self._loop is None or self._stopped:
            raise TransportClosed(f"{self._url} is not open")
        self._enqueue(_Request(run, None, True, _deadline(patience), claims))

    def watch(self, queues: frozenset[str]) -> None:
        """Watch `queues` for other processes' commits and messages coming due (from the loop)."""
        new = queues - self.watching
        self.watching = queues
        if new and not self._stopped:
            # The thread may be asleep until its next renewal: an empty bundle has it work out
            # when to look again, now that there are new queues to look at.
            self._inbox.put([])

    def _enqueue(self, request: _Request[Any]) -> None:
        # Waking the thread at the first request of a burst (250 publishes gathered, the acks of
        # a claim's messages) would have it start a batch while the event loop thread is busy
        # making the rest: the two would take turns with the GIL, and every sqlite3 call (each
        # lets go of the GIL) could wait a whole switch interval to get it back. So requests wait
        # for the end of this turn of the loop, and go over as one.
        assert self._loop is not None
        if not self._outbox:
            self._loop.call_soon(self._hand_over)
        self._outbox.append(request)

    def _hand_over(self) -> None:
        if self._outbox:
            self._inbox.put(self._outbox)
            self._outbox = []

    async def stop(self) -> None:
        """Finish what was submitted, close the connection, end the thread."""
        if self._loop is None or self._stopped:
            return
        self._hand_over()
        self._stopped = True
        done: asyncio.Future[None] = self._loop.create_future()
        self._inbox.put(_Stop(done))
        await done

    # -- on the thread --------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop closed under us, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we write BEGIN/COMMIT ourselves, so one transaction spans a batch.
        connection = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=True
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            connection.execute("BEGIN IMMEDIATE")
            schema.create_schema(connection)
            batch = self._batch(connection)
            queries.delete_orphaned_queues(batch)
            batch.flush()
            connection.execute("COMMIT")
            # From now on `_transaction` waits for locks itself, in finer steps.
            connection.execute("PRAGMA busy_timeout = 0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _batch(self, connection: sqlite3.Connection) -> schema.Batch:
        return schema.Batch(
            connection=connection,
            instance=self._instance,
            lease=self._lease,
            now=time.time(),
            held=self._held,
            temporary=self._temporary,
        )

    def _main(self, started: asyncio.Future[None]) -> None:
        try:
            connection = self._connect()
        except BaseException as error:
            self._post(_resolve, [(started, False, ConnectionFailed(f"cannot open {self._url}: {error}"))])
            return
        self._post(_resolve, [(started, True, None)])
        outcomes: list[_Outcome] = []
        try:
            stop = self._serve(connection)
            outcomes.append((stop.future, True, None))
        except BaseException:
            # A bug, not a database error (those are handled per batch): fail loudly, and fail
            # every waiting caller rather than leave them waiting forever.
            log.exception("%s: the SQLite transport's thread failed", self._url)
            self._stopped = True
        finally:
            connection.close()
        closed = TransportClosed(f"{self._url} closed while the database was locked by another process")
        outcomes.extend((request.future, False, closed) for request in self._retrying)
        self._retrying = []
        failure = TransportError(f"{self._url}: the SQLite transport's thread stopped")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                outcomes.append((item.future, True, None))
            else:
                outcomes.extend((request.future, False, failure) for request in item)
        self._post(_resolve, outcomes)

    def _serve(self, connection: sqlite3.Connection) -> _Stop:
        """Run requests in batches until asked to stop; renew claims; watch other processes."""
        tick = self._lease / 3
        next_renewal = time.monotonic() + tick
        while True:
            try:
                item: list[_Request[Any]] | _Stop | None = self._inbox.get(
                    timeout=self._seconds_to_wait(next_renewal)
                )
            except queue.Empty:
                item = None
            requests: list[_Request[Any]] = []
            while isinstance(item, list):
                requests.extend(item)
                if len(requests) >= MAX_BATCH:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            now = time.monotonic()
            if now >= next_renewal:
                # Before the requests: after a stall (a stopped process), claims and temporary
                # queues are reasserted before anything else is done on their behalf.
                renewed = self._renew(connection)
                next_renewal = time.monotonic() + (tick if renewed else min(tick, self._backoff))
            if self._retrying and (requests or now >= self._retry_at):
                # Requests waiting out a lock go with the next batch: it tries the lock anyway.
                requests = self._retrying + requests
                self._retrying = []
            if requests:
                self._execute(connection, requests)
            if isinstance(item, _Stop):
                return item
            if self.watching and self._seconds_to_wait(next_renewal) == 0.0:
                self._look(connection)

    def _seconds_to_wait(self, next_renewal: float) -> float:
        """Until the next renewal, look at other processes' commits, or message coming due."""
        now = time.monotonic()
        wake_at = next_renewal
        if self._retrying:
            wake_at = min(wake_at, self._retry_at)
        if self.watching:
            wake_at = min(wake_at, self._next_poll)
            first_due = min((self._due.get(queue, 0.0) for queue in self.watching), default=schema.NEVER)
            if first_due != schema.NEVER:
                wake_at = min(wake_at, now + first_due - time.time())
        return max(0.0, wake_at - now)

    def _look(self, connection: sqlite3.Connection) -> None:
        """Wake the receivers of watched queues that (may) have a visible message now."""
        watching = self.watching

        def look(batch: schema.Batch) -> tuple[int, set[str]]:
            version = queries.data_version(batch)
            changed = version != self._seen_version
            ready: set[str] = set()
            for queue_name in watching:
                if changed or self._due.get(queue_name, 0.0) <= batch.now:
                    due = queries.next_visible(batch, queue_name)
                    if due <= batch.now:
                        ready.add(queue_name)
                        # Woken once; the receiver's next claim says when to look again.
                        due = schema.NEVER
                    self._due[queue_name] = due
            return version, ready

        try:
            _, (self._seen_version, ready) = self._transaction(connection, look, write=False)
        except sqlite3.Error as error:
            log.warning("%s: could not look for new messages: %s", self._url, error)
            ready = set()
            # Try again at the next poll, not in a tight loop.
            retry_at = time.time() + self._max_poll_interval
            self._due.update((queue_name, retry_at) for queue_name in watching)
        for queue_name in set(self._due) - watching:
            del self._due[queue_name]
        now = time.monotonic()
        if ready:
            self._post(self._on_ready, ready)
            self._last_activity = now
        if now - self._last_activity < _BUSY_GRACE:
            self._poll_interval = _MIN_POLL_INTERVAL
        else:
            self._poll_interval = min(self._poll_interval * 2, self._max_poll_interval)
        self._next_poll = now + self._poll_interval

    def _transaction(
        self, connection: sqlite3.Connection, run: Callable[[schema.Batch], T], *, write: bool
    ) -> tuple[schema.Batch, T]:
        """`run(batch)` in one transaction, committed. While another process holds the write
        lock, wait and start over, up to `busy_timeout`.

        We wait here rather than in SQLite's busy handler because that one sleeps 1, 2, 5, 10, ...
        up to 100 ms between tries: two busy processes taking turns lost most of their time asleep.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = _FIRST_PAUSE
        while True:
            batch = self._batch(connection)
            try:
                # IMMEDIATE takes the write lock up front: a transaction that reads and then
                # writes could otherwise fail on its first write, after doing its reads.
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                batch.now = time.time()
                result = run(batch)
                batch.flush()
                connection.execute("COMMIT")
                return batch, result
            except sqlite3.Error as error:
                if connection.in_transaction:
                    connection.rollback()
                if not _is_busy(error) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _LAST_PAUSE)

    def _execute(self, connection: sqlite3.Connection, requests: list[_Request[Any]]) -> None:
        """Run `requests` in one transaction; resolve their futures after it committed."""

        def run_all(batch: schema.Batch) -> list[_Outcome]:
            outcomes: list[_Outcome] = []
            for request in requests:
                try:
                    outcomes.append((request.future, True, request.run(batch)))
                except TidingsError as refusal:  # raised before the request wrote anything
                    outcomes.append((request.future, False, refusal))
            return outcomes

        write = any(request.write for request in requests)
        try:
            batch, outcomes = self._transaction(connection, run_all, write=write)
        except Exception as error:
            if _is_busy(error):
                self._locked()
                reads = [request for request in requests if not request.write]
                if write and reads:
                    # The reads in the batch need no write lock (WAL): they go on without the
                    # writes. A consumer's first read shared its batch with a heartbeat's publish
                    # and failed with it, which ended Bus.run().
                    self._execute(connection, reads)
                    requests = [request for request in requests if request.write]
                requests = self._wait_for_lock(requests)
            elif len(requests) > 1:
                # One bad request must not fail the others: run each in its own transaction.
                for request in requests:
                    self._execute(connection, [request])
                return
            self._fail(requests, error)
            return
        if write:  # a read gets through while another process holds the lock: it says nothing
            self._unlocked()
        self._held.update(batch.claimed)
        self._temporary |= batch.declared
        self._due.update(batch.due)
        for queue_name, visible_at in batch.coming.items():
            # A message put in a watched queue for later (a retry, a held-back send) comes due
            # before what the last claim saw: look then. (No entry means: look at once anyway.)
            if queue_name in self._due:
                self._due[queue_name] = min(self._due[queue_name], visible_at)
        if batch.claimed:
            self._last_activity = time.monotonic()
        if any(future is not None for future, _, _ in outcomes):
            self._post(_resolve, outcomes)
        if batch.touched:
            _notify(self._path, batch.touched)

    def _wait_for_lock(self, requests: list[_Request[Any]]) -> list[_Request[Any]]:
        """Keep the patient `requests` to try again after a pause; return the others (they fail)."""
        now = time.monotonic()
        again = [request for request in requests if request.patient_until > now]
        if again:
            self._retrying.extend(again)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, _LAST_BACKOFF)
        return [request for request in requests if request.patient_until <= now]

    def _fail(self, requests: list[_Request[Any]], error: BaseException) -> None:
        if not requests:
            return
        for request in requests:
            for seq in request.claims:
                # Not renewed any more: the message comes back after the visibility timeout,
                # instead of staying claimed by this live process for as long as it lives.
                self._held.pop(seq, None)
        if any(request.future is None for request in requests):
            log.warning("%s: could not settle a message (it will come back): %s", self._url, error)
        self._post(_resolve, [(r.future, False, _translate(error, self._url)) for r in requests])

    def _locked(self) -> None:
        """The write lock stayed held by another process beyond busy_timeout (logged once)."""
        if self._locked_since is None:
            self._locked_since = time.monotonic()
            log.warning(
                "%s: the database stays locked by another process beyond busy_timeout (%g s);"
                " claims and settles wait and try again until it is free",
                self._url,
                self._busy_timeout,
            )

    def _unlocked(self) -> None:
        self._backoff = _FIRST_BACKOFF
        if self._locked_since is not None:
            log.info(
                "%s: the database is free again after %.1f s",
                self._url,
                time.monotonic() - self._locked_since,
            )
            self._locked_since = None

    def _renew(self, connection: sqlite3.Connection) -> bool:
        """Renew this instance's claims and temporary queues; whether that worked."""
        if not self._held and not self._temporary:
            return True
        try:
            _, redeclared = self._transaction(connection, queries.renew, write=True)
        except sqlite3.Error as error:
            # Not fatal yet: the claims last a whole lease and this runs three times per lease.
            if _is_busy(error):
                self._locked()
            else:
                log.warning("%s: could not renew claims: %s", self._url, error)
            return False
        self._unlocked()
        if redeclared:
            log.warning(
                "%s: this instance's lease had run out (a stall?) and its temporary queues were"
                " deleted; declared them again: %s",
                self._url,
                ", ".join(sorted(redeclared)),
            )
        return True
