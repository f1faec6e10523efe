"""The tables of the SQLite transport and every statement run against them.

Each function here runs on the transport's own thread, inside a transaction the writer opened
(`sqlite_worker`), and takes the `Batch` of that transaction. Functions that refuse a request
(`NoRoute`) do so before they write anything, so the rest of the batch can still commit.

One table holds every message of every queue; a message's place in its queue is `(visible_at, seq)`:

- `visible_at` (Unix seconds) is when the message may next be claimed: the commit time for a new
  message, `not_before` or `now + delay` for a held-back one, the claim's expiry while a consumer
  holds it, and 0 for a message given back unhandled (so it is the next one out, like the memory
  transport's `put_back`).
- `claimed_by` names the transport instance holding it. A claim is renewed while that instance
  lives; if the process dies, `visible_at` passes and any consumer may claim the message again.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.errors import ConnectionFailed, NoRoute
from tidings.headers import strip_fault_headers
from tidings.transports.base import DeadLetter, error_queue_of

__all__ = ["NEVER", "SCHEMA_VERSION", "Batch", "Row", "create_schema"]

SCHEMA_VERSION = 1

_TABLES = (
    "CREATE TABLE IF NOT EXISTS tidings_schema (version INTEGER NOT NULL)",
    # owner: the transport instance a temporary queue belongs to; NULL for a durable queue.
    """CREATE TABLE IF NOT EXISTS tidings_queues (
        name TEXT PRIMARY KEY,
        owner TEXT
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tidings_bindings (
        event_type TEXT NOT NULL,
        queue TEXT NOT NULL,
        PRIMARY KEY (event_type, queue)
    ) WITHOUT ROWID""",
    # AUTOINCREMENT: a seq is never reused, so a stale settle (seq, claimed_by, delivery_count)
    # can never hit a newer message.
    """CREATE TABLE IF NOT EXISTS tidings_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        visible_at REAL NOT NULL,
        claimed_by TEXT,
        delivery_count INTEGER NOT NULL DEFAULT 0
    )""",
    # (queue, visible_at, seq): a claim reads the head of this index and sorts nothing; the next
    # due time of a queue is its first entry.
    "CREATE INDEX IF NOT EXISTS tidings_messages_due ON tidings_messages (queue, visible_at)",
    # Instances that own temporary queues, with a lease they renew: the queues of an instance
    # whose lease ran out (its process died) are deleted by the next transport that opens.
    """CREATE TABLE IF NOT EXISTS tidings_instances (
        id TEXT PRIMARY KEY,
        alive_until REAL NOT NULL
    ) WITHOUT ROWID""",
)


@dataclass(frozen=True, slots=True)
class Row:
    """A claimed message."""

    seq: int
    headers: dict[str, str]
    body: bytes
    delivery_count: int


NEVER = float("inf")


_INSERT = "INSERT INTO tidings_messages (queue, message_id, headers, body, visible_at) VALUES "
#: The most rows one INSERT takes (5 parameters each, SQLite allows 32,766 since 3.32).
_MOST_ROWS_PER_INSERT = 512


@functools.cache
def _insert(rows: int) -> str:
    return _INSERT + ", ".join(["(?, ?, ?, ?, ?)"] * rows)


# Acked rows go in one statement: a JSON array of [seq, delivery_count] pairs, each looked up by seq.
_DELETE_SETTLED = (
    "DELETE FROM tidings_messages WHERE seq IN (SELECT m.seq FROM json_each(?) AS j"
    " JOIN tidings_messages AS m ON m.seq = json_extract(j.value, '$[0]')"
    " AND m.delivery_count = json_extract(j.value, '$[1]') WHERE m.claimed_by = ?)"
)


@dataclass(slots=True)
class Batch:
    """One transaction on the transport's thread, and what it did (applied after the commit).

    Writes to messages are deferred and made together, in as few statements as possible, before
    the next `execute` and before the commit: new messages in multi-row INSERTs, acks in one
    DELETE, other statements with the same SQL in one `executemany`. Few statements matter more
    than they seem: `sqlite3` lets go of the GIL around every step of every statement, and while
    the event loop thread is busy, getting it back can take the whole switch interval (5 ms).
    Deferred statements never touch the topology (queues and bindings), so topology lookups,
    cached for the transaction, need not wait for them.
    """

    connection: sqlite3.Connection
    #: The transport instance: the claim token on rows it holds, the owner of its temporary queues.
    instance: str
    #: The claim lease, in seconds (the visibility timeout).
    lease: float
    #: Time at the start of the transaction, under the write lock: commit order is time order.
    now: float
    #: The claims this instance holds, `seq -> delivery_count` (owned by the thread: no lock).
    held: dict[int, int]
    #: Claims made in this batch; added to `held` once it committed.
    claimed: dict[int, int] = field(default_factory=dict)
    #: Queues that got a message: receivers in this process are woken once it committed.
    touched: set[str] = field(default_factory=set)
    #: For queues a claim emptied: when their next message becomes visible (`NEVER`: none yet).
    due: dict[str, float] = field(default_factory=dict)
    owns_temporary: bool = False
    _inserts: list[tuple[str, str, str, bytes, float]] = field(default_factory=list)
    _acks: list[tuple[int, int]] = field(default_factory=list)
    _deferred: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)
    _bindings: dict[str, list[str]] = field(default_factory=dict)
    _queues: dict[str, bool] = field(default_factory=dict)

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        self.flush()
        return self.connection.execute(sql, parameters)

    def insert(self, queue: str, message_id: str, headers: str, body: bytes, visible_at: float) -> None:
        self._inserts.append((queue, message_id, headers, body, visible_at))

    def delete_settled(self, seq: int, delivery_count: int) -> None:
        self._acks.append((seq, delivery_count))

    def defer(self, sql: str, parameters: tuple[Any, ...]) -> None:
        if self._deferred and self._deferred[-1][0] == sql:
            self._deferred[-1][1].append(parameters)
        else:
            self._deferred.append((sql, [parameters]))

    def flush(self) -> None:
        # The deferred writes touch different rows, so their order among kinds does not matter;
        # rows inserted together keep their order (and so their seq order).
        inserts, start = self._inserts, 0
        while start < len(inserts):
            # Powers of two: a handful of distinct statements, all in sqlite3's statement cache.
            rows = min(_MOST_ROWS_PER_INSERT, 1 << ((len(inserts) - start).bit_length() - 1))
            values = [value for row in inserts[start : start + rows] for value in row]
            self.connection.execute(_insert(rows), values)
            start += rows
        inserts.clear()
        if self._acks:
            self.connection.execute(_DELETE_SETTLED, (json.dumps(self._acks), self.instance))
            self._acks.clear()
        for sql, parameters in self._deferred:
            self.connection.executemany(sql, parameters)
        self._deferred.clear()

    def queue_exists(self, queue: str) -> bool:
        if queue not in self._queues:
            found = self.connection.execute("SELECT 1 FROM tidings_queues WHERE name = ?", (queue,))
            self._queues[queue] = found.fetchone() is not None
        return self._queues[queue]

    def bound_queues(self, event_type: str) -> list[str]:
        if event_type not in self._bindings:
            found = self.connection.execute(
                "SELECT queue FROM tidings_bindings WHERE event_type = ? ORDER BY queue", (event_type,)
            )
            self._bindings[event_type] = [queue for (queue,) in found]
        return self._bindings[event_type]

    def topology_changed(self) -> None:
        self._bindings.clear()
        self._queues.clear()


def create_schema(connection: sqlite3.Connection) -> None:
    """Create the tables if missing (inside the caller's transaction) and check the version."""
    for statement in _TABLES:
        connection.execute(statement)
    row = connection.execute("SELECT max(version) FROM tidings_schema").fetchone()
    if row[0] is None:
        connection.execute("INSERT INTO tidings_schema (version) VALUES (?)", (SCHEMA_VERSION,))
    elif row[0] != SCHEMA_VERSION:
        raise ConnectionFailed(
            f"the database has tidings schema version {row[0]}; this tidings knows {SCHEMA_VERSION}"
        )


def require_queue(batch: Batch, queue: str) -> None:
    """`NoRoute` unless `queue` exists."""
    if not batch.queue_exists(queue):
        raise NoRoute(f"no queue {queue!r}")


def delete_orphaned_queues(batch: Batch) -> None:
    """Delete the temporary queues (and their messages) of instances whose lease ran out."""
    batch.topology_changed()
    batch.execute("DELETE FROM tidings_instances WHERE alive_until < ?", (batch.now,))
    orphans = (
        "SELECT name FROM tidings_queues WHERE owner IS NOT NULL"
        " AND owner NOT IN (SELECT id FROM tidings_instances)"
    )
    batch.execute(f"DELETE FROM tidings_messages WHERE queue IN ({orphans})")
    batch.execute(f"DELETE FROM tidings_bindings WHERE queue IN ({orphans})")
    batch.execute(f"DELETE FROM tidings_queues WHERE name IN ({orphans})")


def declare_queue(batch: Batch, queue: str, *, temporary: bool) -> None:
    batch.topology_changed()
    for name in (queue, error_queue_of(queue)):
        if temporary:
            batch.execute(
                "INSERT INTO tidings_queues (name, owner) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner",
                (name, batch.instance),
            )
        else:
            batch.execute("INSERT OR IGNORE INTO tidings_queues (name) VALUES (?)", (name,))
    if temporary:
        batch.execute(
            "INSERT OR REPLACE INTO tidings_instances (id, alive_until) VALUES (?, ?)",
            (batch.instance, batch.now + batch.lease),
        )
        batch.owns_temporary = True


def bind(batch: Batch, queue: str, event_type: str) -> None:
    require_queue(batch, queue)
    batch.topology_changed()
    batch.execute(
        "INSERT OR IGNORE INTO tidings_bindings (event_type, queue) VALUES (?, ?)", (event_type, queue)
    )


def unbind(batch: Batch, queue: str, event_type: str) -> None:
    batch.topology_changed()
    batch.execute("DELETE FROM tidings_bindings WHERE event_type = ? AND queue = ?", (event_type, queue))


def publish(
    batch: Batch, event_type: str, message_id: str, headers: str, body: bytes, not_before: float | None
) -> None:
    visible_at = batch.now if not_before is None else max(batch.now, not_before)
    # Bindings are deleted with their queue, so every bound queue exists.
    for queue in batch.bound_queues(event_type):
        batch.insert(queue, message_id, headers, body, visible_at)
        batch.touched.add(queue)


def send(
    batch: Batch, queue: str, message_id: str, headers: str, body: bytes, not_before: float | None
) -> None:
    require_queue(batch, queue)
    visible_at = batch.now if not_before is None else max(batch.now, not_before)
    batch.insert(queue, message_id, headers, body, visible_at)
    batch.touched.add(queue)


def data_version(batch: Batch) -> int:
    version: int = batch.execute("PRAGMA data_version").fetchone()[0]
    return version


def next_visible(batch: Batch, queue: str) -> float:
    """When the first message of `queue` is (or was) visible: held-back and claimed ones included."""
    (first,) = batch.execute(
        "SELECT min(visible_at) FROM tidings_messages WHERE queue = ?", (queue,)
    ).fetchone()
    return NEVER if first is None else float(first)


def claim(batch: Batch, queue: str, limit: int) -> list[Row]:
    """Claim up to `limit` visible messages of `queue`, oldest first."""
    # One row of JSON rather than `limit` rows: one step of the statement, one wait for the GIL.
    (found,) = batch.execute(
        "SELECT json_group_array(json_array(visible_at, seq, json(headers), hex(body), delivery_count))"
        " FROM (SELECT visible_at, seq, headers, body, delivery_count FROM tidings_messages"
        " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?)",
        (queue, batch.now, limit),
    ).fetchone()
    # Sorted here: SQL does not promise that an aggregate sees rows in the subquery's order.
    rows = [
        Row(seq, headers, bytes.fromhex(body), count + 1)
        for _, seq, headers, body, count in sorted(json.loads(found))
    ]
    if rows:
        batch.execute(
            "UPDATE tidings_messages SET claimed_by = ?, visible_at = ?, delivery_count = delivery_count + 1"
            " WHERE seq IN (SELECT value FROM json_each(?))",
            (batch.instance, batch.now + batch.lease, json.dumps([row.seq for row in rows])),
        )
        batch.claimed.update((row.seq, row.delivery_count) for row in rows)
    if len(rows) < limit:
        # Everything left is held back or claimed: the first of them is when to look again.
        batch.due[queue] = next_visible(batch, queue)
    return rows


# Settling touches a row only while this instance still holds that claim: if the claim expired and
# the message went to another consumer (or back to this one), a late settle changes nothing.
_MINE = "seq = ? AND claimed_by = ? AND delivery_count = ?"


def ack(batch: Batch, seq: int, delivery_count: int) -> None:
    # The claim is given up even if the commit fails: the message then comes back after the
    # visibility timeout rather than being held (and renewed) by this live process forever.
    batch.held.pop(seq, None)
    batch.delete_settled(seq, delivery_count)


def retry_later(batch: Batch, queue: str, seq: int, delivery_count: int, headers: str, delay: float) -> None:
    batch.held.pop(seq, None)
    # A retried message is counted as a new delivery: its count starts again, as in memory.py.
    batch.defer(
        f"UPDATE tidings_messages SET headers = ?, visible_at = ?, claimed_by = NULL, delivery_count = 0"
        f" WHERE {_MINE}",
        (headers, batch.now + max(delay, 0.0), seq, batch.instance, delivery_count),
    )
    batch.touched.add(queue)


def dead_letter(batch: Batch, queue: str, seq: int, delivery_count: int, headers: str) -> None:
    batch.held.pop(seq, None)
    error_queue = error_queue_of(queue)
    batch.defer(
        "UPDATE tidings_messages SET queue = ?, headers = ?, visible_at = ?, claimed_by = NULL,"
        f" delivery_count = 0 WHERE {_MINE}",
        (error_queue, headers, batch.now, seq, batch.instance, delivery_count),
    )
    batch.touched.add(error_queue)


def release(batch: Batch, queue: str, rows: Sequence[tuple[int, int]], *, handed_out: bool) -> None:
    """Give claimed `(seq, delivery_count)` rows back, first in line. Rows never `handed_out` to a
    consumer (prefetched, then the iterator closed) get their claim's count back."""
    uncount = 0 if handed_out else 1
    for seq, count in rows:
        batch.held.pop(seq, None)
        batch.defer(
            "UPDATE tidings_messages SET visible_at = 0, claimed_by = NULL,"
            f" delivery_count = delivery_count - {uncount} WHERE {_MINE}",
            (seq, batch.instance, count),
        )
    batch.touched.add(queue)


def renew(batch: Batch) -> None:
    """Extend every claim this instance holds, and its lease on its temporary queues."""
    if batch.held:
        batch.execute(
            "UPDATE tidings_messages SET visible_at = ?"
            " WHERE claimed_by = ? AND seq IN (SELECT value FROM json_each(?))",
            (batch.now + batch.lease, batch.instance, json.dumps(list(batch.held))),
        )
    if batch.owns_temporary:
        batch.execute(
            "UPDATE tidings_instances SET alive_until = ? WHERE id = ?",
            (batch.now + batch.lease, batch.instance),
        )


def close_instance(batch: Batch, prefetched: Sequence[tuple[str, int, int]]) -> None:
    """What closing does: return what this instance holds, delete its temporary queues."""
    for queue, seq, count in prefetched:
        release(batch, queue, [(seq, count)], handed_out=False)
    if batch.held:
        returned = batch.execute(
            "UPDATE tidings_messages SET visible_at = 0, claimed_by = NULL"
            " WHERE claimed_by = ? AND seq IN (SELECT value FROM json_each(?)) RETURNING queue",
            (batch.instance, json.dumps(list(batch.held))),
        ).fetchall()
        batch.touched.update(queue for (queue,) in returned)
        batch.held.clear()
    batch.topology_changed()
    mine = "SELECT name FROM tidings_queues WHERE owner = ?"
    batch.execute(f"DELETE FROM tidings_messages WHERE queue IN ({mine})", (batch.instance,))
    batch.execute(f"DELETE FROM tidings_bindings WHERE queue IN ({mine})", (batch.instance,))
    batch.execute("DELETE FROM tidings_queues WHERE owner = ?", (batch.instance,))
    batch.execute("DELETE FROM tidings_instances WHERE id = ?", (batch.instance,))


def dead_letters(batch: Batch, queue: str, limit: int) -> list[DeadLetter]:
    error_queue = error_queue_of(queue)
    require_queue(batch, error_queue)
    found = batch.execute(
        "SELECT message_id, headers, body FROM tidings_messages"
        " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?",
        (error_queue, batch.now, limit),
    ).fetchall()
    return [DeadLetter(message_id, json.loads(headers), body) for message_id, headers, body in found]


def replay(batch: Batch, queue: str, message_ids: Sequence[str] | None) -> int:
    require_queue(batch, queue)
    wanted = None if message_ids is None else set(message_ids)
    found = batch.execute(
        "SELECT seq, message_id, headers FROM tidings_messages"
        " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq",
        (error_queue_of(queue), batch.now),
    ).fetchall()
    moved = 0
    for seq, message_id, headers in found:
        if wanted is None or message_id in wanted:
            # Same seq, same visible_at: replayed messages keep their order among themselves.
            batch.defer(
                "UPDATE tidings_messages SET queue = ?, headers = ?, visible_at = ?, claimed_by = NULL,"
                " delivery_count = 0 WHERE seq = ?",
                (queue, json.dumps(strip_fault_headers(json.loads(headers))), batch.now, seq),
            )
            moved += 1
    if moved:
        batch.touched.add(queue)
    return moved


def purge_dead_letters(batch: Batch, queue: str) -> int:
    error_queue = error_queue_of(queue)
    require_queue(batch, error_queue)
    deleted = batch.execute(
        "DELETE FROM tidings_messages WHERE queue = ? AND visible_at <= ?", (error_queue, batch.now)
    )
    return deleted.rowcount
