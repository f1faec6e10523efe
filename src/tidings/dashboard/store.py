"""`Store`: the dashboard's database: what ingestion writes and the pages read.

    store = await Store.open("sqlite:///tidings-dashboard.db")   # or postgresql://user@host/db

Writes are batched (one transaction per group of audit batches, `add`); reads are single indexed
queries, so a conversation page stays fast however many records are kept; `delete_older` removes
old records a batch at a time, each its own short transaction, so ingestion never waits behind a
long one.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json
from sqlalchemy import and_, bindparam, delete, event, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tidings.audit import AuditRecord, Heartbeat
from tidings.audit.records import RECORD_FIELDS
from tidings.dashboard.schema import instances, messages, metadata, services
from tidings.errors import ConfigurationError

__all__ = ["DEFAULT_STORE", "Store", "StoredRecord", "distinct", "engine_url"]

DEFAULT_STORE = "sqlite:///tidings-dashboard.db"


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """An audit record as stored, with its row id (what the pages link to)."""

    id: int
    record: AuditRecord


def engine_url(url: str) -> str:
    """The SQLAlchemy URL of a store URL: `sqlite:///` and `postgresql://` get their async drivers."""
    parsed = make_url(url)
    if parsed.drivername == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if parsed.drivername in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        return url
    raise ConfigurationError(f"--store takes a sqlite:/// or postgresql:// URL, not {url!r}")


def _beat_row(beat: Heartbeat) -> dict[str, Any]:
    row = beat.to_json()
    row["counters"] = json.dumps(beat.counters)
    return row


def _record_of(row: Any) -> StoredRecord:
    data = dict(row._mapping)
    identity = data.pop("id")
    data["headers"] = json.loads(data["headers"])
    return StoredRecord(identity, AuditRecord(**data))


class Store:
    """The dashboard's tables in one database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # The records' insert, compiled once for this database and run with rows of plain values
        # (`exec_driver_sql`): SQLAlchemy's per-row parameter processing of `messages.insert()`
        # was the largest part of the store's time on the event loop (bench/audit_store.py), and
        # these columns need none (text, numbers, None; the headers made JSON text here).
        compiled = messages.insert().compile(dialect=engine.dialect, column_keys=RECORD_FIELDS)
        self._insert_records = compiled.string
        names = list(compiled.positiontup or ())
        if sorted(names) != sorted(RECORD_FIELDS):
            raise RuntimeError(f"the records' insert binds {names}, not the record's fields")
        self._values = operator.attrgetter(*names)
        self._headers_at = names.index("headers")
        # Built once with bound parameters, so that SQLAlchemy compiles each a single time (a
        # statement with its values inline was compiled again for every batch).
        services_insert = self._insert(services).values(
            service=bindparam("service"), last_seen=bindparam("last_seen")
        )
        newer = func.max if engine.dialect.name == "sqlite" else func.greatest
        self._upsert_services = services_insert.on_conflict_do_update(
            index_elements=[services.c.service],
            set_={"last_seen": newer(services.c.last_seen, services_insert.excluded.last_seen)},
        )
        beats_insert = self._insert(instances).values(
            {column.name: bindparam(column.name) for column in instances.columns}
        )
        self._upsert_instances = beats_insert.on_conflict_do_update(
            index_elements=[instances.c.instance],
            set_={c.name: beats_insert.excluded[c.name] for c in instances.columns if c.name != "instance"},
            where=instances.c.sent_at <= beats_insert.excluded.sent_at,
        )

    @classmethod
    async def open(cls, url: str = DEFAULT_STORE) -> Store:
        engine = create_async_engine(engine_url(url))
        if engine.dialect.name == "sqlite":

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(connection: Any, record: Any) -> None:
                # WAL: the pages read while ingestion writes; NORMAL: no fsync per commit. This is
                # a monitoring store: a power cut may lose its last commits, which the audit queue
                # gives again only if they were not yet acknowledged; losing a few records of the
                # last second is the price of not paying an fsync per batch.
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.close()

        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- writing -----------------------------------------------------------------------------

    async def add(self, records: Sequence[AuditRecord], beats: Sequence[Heartbeat] = ()) -> None:
        """Store records (in this order) and heartbeats, and note their services, in one transaction.

        Of several heartbeats of one instance the newest is kept, as if stored one by one.
        """
        if not records and not beats:
            return
        last_seen: dict[str, float] = {}
        for record in records:
            seen = last_seen.get(record.service)
            if seen is None or record.processed_at > seen:
                last_seen[record.service] = record.processed_at
        newest: dict[str, Heartbeat] = {}
        for beat in beats:
            kept = newest.get(beat.instance)
            if kept is None or kept.sent_at <= beat.sent_at:
                newest[beat.instance] = beat
            seen = last_seen.get(beat.service)
            if seen is None or beat.sent_at > seen:
                last_seen[beat.service] = beat.sent_at
        async with self.engine.begin() as connection:
            if records:
                await connection.exec_driver_sql(self._insert_records, self._rows(records))
            if newest:
                await connection.execute(self._upsert_instances, [_beat_row(b) for b in newest.values()])
            await connection.execute(
                self._upsert_services, [{"service": s, "last_seen": t} for s, t in last_seen.items()]
            )

    async def add_records(self, records: Sequence[AuditRecord]) -> None:
        """Store a batch of records, and note their services, in one transaction."""
        await self.add(records)

    async def add_heartbeat(self, beat: Heartbeat) -> None:
        """Keep an instance's latest heartbeat (an older one arriving late changes nothing)."""
        await self.add((), [beat])

    def _rows(self, records: Sequence[AuditRecord]) -> list[tuple[Any, ...]]:
        values, at = self._values, self._headers_at
        rows = []
        for record in records:
            row = values(record)
            # pydantic-core's encoder: a fifth of `json.dumps`'s time on a record's headers,
            # which were a fifth of ingestion's; the pages read either with `json.loads`.
            rows.append((*row[:at], to_json(row[at]).decode(), *row[at + 1 :]))
        return rows

    async def delete_older(self, before: float, *, batch: int) -> int:
        """Delete up to `batch` records processed before `before` (oldest first); how many went."""
        oldest = select(messages.c.id).where(messages.c.processed_at < before).order_by(messages.c.id)
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(messages).where(messages.c.id.in_(oldest.limit(batch))))
        return int(result.rowcount or 0)

    async def forget_instances(self, before: float) -> int:
        """Forget instances whose last heartbeat is older than `before`."""
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(instances).where(instances.c.sent_at < before))
        return int(result.rowcount or 0)

    # -- reading -----------------------------------------------------------------------------

    async def services(self) -> list[str]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(select(services.c.service).order_by(services.c.service))
            return [row[0] for row in rows]

    async def instances(self) -> list[Heartbeat]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(instances).order_by(instances.c.service, instances.c.instance)
            )
            found = []
            for row in rows:
                data = dict(row._mapping)
                data["counters"] = json.loads(data["counters"])
                data["stopping"] = bool(data["stopping"])
                found.append(Heartbeat(**data))
            return found

    async def window(
        self, since: float, *, sample: int = 20_000
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, float]]]:
        """Since `since`: (service, outcome, count), and (service, duration_ms) of the newest
        `sample` records, for the percentiles: a busy system's five minutes can be a million rows,
        and the services page is redrawn at every heartbeat."""
        counts = (
            select(messages.c.service, messages.c.outcome, func.count())
            .where(messages.c.processed_at >= since)
            .group_by(messages.c.service, messages.c.outcome)
        )
        newest = (
            select(messages.c.service, messages.c.duration_ms)
            .where(messages.c.processed_at >= since)
            .order_by(messages.c.id.desc())
            .limit(sample)
        )
        async with self.engine.connect() as connection:
            counted = [(row[0], row[1], int(row[2])) for row in await connection.execute(counts)]
            durations = [(row[0], float(row[1])) for row in await connection.execute(newest)]
        return counted, durations

    async def conversation(self, correlation_id: str, *, limit: int = 2000) -> list[StoredRecord]:
        """The records of one conversation, in the order they were stored."""
        query = (
            select(messages)
            .where(messages.c.correlation_id == correlation_id)
            .order_by(messages.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            return [_record_of(row) for row in await connection.execute(query)]

    async def record(self, identity: int) -> StoredRecord | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(messages).where(messages.c.id == identity))).first()
        return _record_of(row) if row is not None else None

    async def deliveries_of(self, message_id: str) -> list[StoredRecord]:
        """Every record of one message id (its deliveries, in every service that got it)."""
        query = select(messages).where(messages.c.message_id == message_id).order_by(messages.c.id)
        async with self.engine.connect() as connection:
            return [_record_of(row) for row in await connection.execute(query)]

    async def find(self, text: str, *, limit: int = 50, scan: int = 200_000) -> list[str]:
        """The conversations (correlation ids, newest first) with `text` as their correlation id,
        a message id, or else a value in a message body.

        The body search looks at the newest `scan` records only: it cannot use an index, and an
        operator looking for an order id wants a recent one.
        """
        newest = func.max(messages.c.id)
        exact = (
            select(messages.c.correlation_id)
            .where(or_(messages.c.correlation_id == text, messages.c.message_id == text))
            .where(messages.c.correlation_id.is_not(None))
            .group_by(messages.c.correlation_id)
            .order_by(newest.desc())
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            found = [row[0] for row in await connection.execute(exact)]
            if found:
                return found
            last = (await connection.execute(select(newest))).scalar() or 0
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query = (
                select(messages.c.correlation_id)
                .where(
                    and_(
                        messages.c.id > last - scan,
                        messages.c.correlation_id.is_not(None),
                        messages.c.body.like(pattern, escape="\\"),
                    )
                )
                .group_by(messages.c.correlation_id)
                .order_by(newest.desc())
                .limit(limit)
            )
            return [row[0] for row in await connection.execute(query)]

    async def first_records(self, correlation_ids: Sequence[str]) -> dict[str, StoredRecord]:
        """The first record stored of each conversation (what it started with)."""
        found: dict[str, StoredRecord] = {}
        async with self.engine.connect() as connection:
            for correlation_id in correlation_ids:
                query = (
                    select(messages)
                    .where(messages.c.correlation_id == correlation_id)
                    .order_by(messages.c.sent_at, messages.c.id)  # stored in arrival order, not sent
                    .limit(1)
                )
                row = (await connection.execute(query)).first()
                if row is not None:
                    found[correlation_id] = _record_of(row)
        return found

    async def recent(self, *, limit: int = 300) -> list[StoredRecord]:
        query = select(messages).order_by(messages.c.id.desc()).limit(limit)
        async with self.engine.connect() as connection:
            return [_record_of(row) for row in await connection.execute(query)]

    async def count(self) -> int:
        async with self.engine.connect() as connection:
            return int((await connection.execute(select(func.count()).select_from(messages))).scalar() or 0)


def distinct(values: Iterable[str | None]) -> list[str]:
    """The values in order of first appearance, without None or repeats."""
    seen: dict[str, None] = {}
    for value in values:
        if value:
            seen.setdefault(value, None)
    return list(seen)
