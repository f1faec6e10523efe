"""`Bus(..., audit=True)`: an audit record for every delivery settled, on the audit queue of the
bus's own transport (SQLite, and RabbitMQ); the heartbeats every running bus publishes, audit on
or not; both read back as the dashboard does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import system_url, unique
from tests.dashboard.audit_queue import Feed, listen_for_heartbeats, read_feed
from tests.helpers import eventually, running
from tidings import Bus, Command, Context, Envelope, Event, RetryPolicy
from tidings.audit import AuditSettings
from tidings.errors import NoRoute


class Ordered(Event, name="audit-test.ordered"):
    n: int
    note: str = ""


class Ship(Command, name="audit-test.ship"):
    n: int


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_every_settled_delivery_is_audited_with_its_outcome(kind: str, tmp_path: Path) -> None:
    url = system_url(kind, tmp_path)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}")
    settings = AuditSettings(max_body=12, flush_interval=0.05)
    shop = Bus(
        unique("shop"),
        url,
        database=engine,
        audit=settings,
        heartbeat_interval=0.2,
        telemetry=False,
        retry=RetryPolicy(immediate=1, delays=(0.1,)),
    )
    warehouse = Bus(unique("warehouse"), url, audit=settings, heartbeat_interval=0.2, telemetry=False)
    beats_queue = await listen_for_heartbeats(url)
    shop.route(Ship, to=warehouse.service)
    calls: dict[int, int] = {}
    envelopes: dict[int, Envelope] = {}

    @shop.subscribe(Ordered)
    async def on_ordered(event: Ordered, ctx: Context) -> None:
        calls[event.n] = calls.get(event.n, 0) + 1
        envelopes[event.n] = ctx.envelope
        if event.n == 2 and calls[2] <= 2:
            raise RuntimeError("flaky, once per round")  # round 1 fails twice, round 2 succeeds
        if event.n == 3:
            raise ValueError("never")
        await ctx.send(Ship(n=event.n))

    shipped: list[int] = []

    @warehouse.handle(Ship)
    async def ship(command: Ship, ctx: Context) -> None:
        shipped.append(command.n)

    await shop.create_tables()
    async with running(shop, warehouse):
        for n in (1, 2, 3):
            await warehouse.publish(Ordered(n=n, note="x" * 40), correlation_id=f"order-{n}")
        await eventually(lambda: sorted(shipped) == [1, 2] and shop.stats.dead_lettered == 1)
        # The same message once more, as an at-least-once transport may: the inbox skips it.
        await shop.transport.send(envelopes[1], shop.queue)
        await eventually(lambda: shop.stats.duplicates == 1)
        await asyncio.sleep(0.3)  # a heartbeat after the work
    await engine.dispose()

    def complete(feed: Feed) -> bool:
        stopped = {b.instance for b in feed.beats if b.stopping}
        return len(feed.records) >= 8 and stopped >= {shop.audit.instance, warehouse.audit.instance}  # type: ignore[union-attr]

    feed = await read_feed(url, complete, heartbeats=beats_queue)
    assert shop.audit is not None
    assert warehouse.audit is not None
    by = {(r.service, r.correlation_id, r.outcome, r.round): r for r in feed.records}
    outcomes = sorted((r.service == shop.service, r.correlation_id, r.outcome, r.round) for r in feed.records)
    assert outcomes == [
        (False, "order-1", "handled", 1),  # the warehouse's Ship
        (False, "order-2", "handled", 1),
        (True, "order-1", "duplicate", 1),
        (True, "order-1", "handled", 1),
        (True, "order-2", "handled", 2),  # handled on the delayed retry
        (True, "order-2", "retried", 1),
        (True, "order-3", "dead-lettered", 2),  # its delayed retry failed too
        (True, "order-3", "retried", 1),
    ], outcomes
    handled = by[(shop.service, "order-1", "handled", 1)]
    assert handled.type == "audit-test.ordered"
    assert handled.source == warehouse.service
    assert handled.queue == shop.queue
    assert handled.instance == shop.audit.instance
    assert handled.message_id == envelopes[1].id
    assert handled.duration_ms > 0
    assert handled.sent_at is not None
    assert handled.processed_at >= handled.sent_at
    assert handled.body_size > 40
    assert len(handled.body.encode()) == 12
    assert handled.headers["correlationid"] == "order-1"
    retried = by[(shop.service, "order-2", "retried", 1)]
    assert (retried.reason, retried.failures, retried.error_type) == ("handler-failed", 2, "RuntimeError")
    dead = by[(shop.service, "order-3", "dead-lettered", 2)]
    assert (dead.reason, dead.error_type, dead.error_message) == ("handler-failed", "ValueError", "never")
    # The command the shop sent while handling order-1 names its cause.
    shipped_record = by[(warehouse.service, "order-1", "handled", 1)]
    assert shipped_record.causation_id == envelopes[1].id
    assert shipped_record.source == shop.service
    # Records travel in batches: fewer audit messages than records. Heartbeats are not on the
    # audit queue: they are published, and came through the queue bound to them.
    assert feed.messages["tidings.audit-records"] < len(feed.records)

    # Heartbeats: who, where, what version, and the counters as they grew; a last one on stopping.
    beats = [b for b in feed.beats if b.instance == shop.audit.instance]
    assert len(beats) >= 2
    assert beats[-1].stopping
    assert not beats[0].stopping
    last = beats[-1]
    assert last.service == shop.service
    assert last.pid > 0
    assert last.host
    assert last.version
    # `handled` counts the duplicate too: the pipeline acknowledged it like any other.
    assert last.counters["handled"] == 3
    assert last.counters["dead_lettered"] == 1
    assert last.counters["duplicates"] == 1
    assert last.counters["retries_scheduled"] == 2
    assert "relayed" in last.counters
    assert last.counters["relayed"] >= 2
    assert last.outbox_backlog is not None  # the relay's last look at its backlog, reported
    assert beats[0].outbox_backlog is None or beats[0].outbox_backlog >= 0
    assert last.audit_dropped == 0


async def test_audit_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://{unique()}"
    monkeypatch.delenv("TIDINGS_AUDIT", raising=False)
    quiet = Bus("quiet", url, telemetry=False)
    assert quiet.audit is None
    async with running(quiet):
        pass
    async with quiet.transport as transport:
        with pytest.raises(NoRoute):  # nothing declared the audit queue
            await transport.send(Envelope(type="x", source="t", body=b"{}"), "tidings.audit")

    monkeypatch.setenv("TIDINGS_AUDIT", "1")  # like $TIDINGS_TRANSPORT: for a bus made without audit=
    assert Bus("told", url, telemetry=False).audit is not None
    assert Bus("refused", url, telemetry=False, audit=False).audit is None
