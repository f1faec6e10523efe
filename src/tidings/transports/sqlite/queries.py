"""Every statement the SQLite transport runs, one function per request (tables: `schema`).

Each function runs on the thread that owns the transport's connection (`connection_thread`),
inside the transaction of the `Batch` it takes. Functions that refuse a request (`NoRoute`) do so
before they write anything, so the rest of the batch can still commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tidings.errors import NoRoute
from tidings.headers import strip_fault_headers
from tidings.transports.base import DeadLetter, error_queue_of
from tidings.transports.sqlite.schema import NEVER, Batch, Row


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
        batch.declared.add(queue)


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


def send(
    batch: Batch, queue: str, message_id: str, headers: str, body: bytes, not_before: float | None
) -> None:
    require_queue(batch, queue)
    visible_at = batch.now if not_before is None else max(batch.now, not_before)
    batch.insert(queue, message_id, headers, body, visible_at)


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
    visible_at = batch.now + max(delay, 0.0)
    # A retried message is counted as a new delivery: its count starts again, as in memory.py.
    batch.defer(
        f"UPDATE tidings_messages SET headers = ?, visible_at = ?, claimed_by = NULL, delivery_count = 0"
        f" WHERE {_MINE}",
        (headers, visible_at, seq, batch.instance, delivery_count),
    )
    batch.fill(queue, visible_at)


def dead_letter(batch: Batch, queue: str, seq: int, delivery_count: int, headers: str) -> None:
    batch.held.pop(seq, None)
    error_queue = error_queue_of(queue)
    batch.defer(
        "UPDATE tidings_messages SET queue = ?, headers = ?, visible_at = ?, claimed_by = NULL,"
        f" delivery_count = 0 WHERE {_MINE}",
        (error_queue, headers, batch.now, seq, batch.instance, delivery_count),
    )
    batch.fill(error_queue, batch.now)


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
    batch.fill(queue, 0.0)


def renew(batch: Batch) -> set[str]:
    """Extend every claim this instance holds, and its lease on its temporary queues.

    Returns the temporary queues it had to declare again: when this instance stalled past its
    lease (a stopped process), another transport may have deleted them as orphans; this instance
    is alive after all, and its reply queue must be there for the replies to its next requests.
    """
    if batch.held:
        batch.execute(
            "UPDATE tidings_messages SET visible_at = ?"
            " WHERE claimed_by = ? AND seq IN (SELECT value FROM json_each(?))",
            (batch.now + batch.lease, batch.instance, json.dumps(list(batch.held))),
        )
    if not batch.temporary:
        return set()
    renewed = batch.execute(
        "UPDATE tidings_instances SET alive_until = ? WHERE id = ?",
        (batch.now + batch.lease, batch.instance),
    )
    if renewed.rowcount:
        return set()
    # What was in them is gone with them (and their bindings: a reply queue has none).
    for queue in batch.temporary:
        declare_queue(batch, queue, temporary=True)
    return set(batch.temporary)


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
        batch.fill(queue, batch.now)
    return moved


def purge_dead_letters(batch: Batch, queue: str) -> int:
    error_queue = error_queue_of(queue)
    require_queue(batch, error_queue)
    deleted = batch.execute(
        "DELETE FROM tidings_messages WHERE queue = ? AND visible_at <= ?", (error_queue, batch.now)
    )
    return deleted.rowcount
