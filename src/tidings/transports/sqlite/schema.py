"""The tables of the SQLite transport, and `Batch`: one transaction of its thread.

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
from dataclasses import dataclass, field
from typing import Any

from tidings.errors import ConnectionFailed

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
    #: The temporary queues this instance owns (as of the start of the transaction).
    temporary: frozenset[str] = frozenset()
    #: Temporary queues declared in this batch; added to `temporary` once it committed.
    declared: set[str] = field(default_factory=set)
    #: Queues that got a message: receivers in this process are woken once it committed.
    touched: set[str] = field(default_factory=set)
    #: For queues a claim emptied: when their next message becomes visible (`NEVER`: none yet).
    due: dict[str, float] = field(default_factory=dict)
    #: For queues that got a message (see `fill`): the earliest `visible_at` among those.
    coming: dict[str, float] = field(default_factory=dict)
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
        self.fill(queue, visible_at)

    def fill(self, queue: str, visible_at: float) -> None:
        """Note that a message becomes visible in `queue` at `visible_at`: receivers of it in this
        process are woken, and the thread knows when to look at it again (a retry, a delay)."""
        self.touched.add(queue)
        self.coming[queue] = min(self.coming.get(queue, NEVER), visible_at)

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
