"""One trace through the outbox: the context of the code that writes a row is stored with it, and
the relay's send and the next service's handling continue it, service after service."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.storage.databases import sqlite_engine
from tests.telemetry.conftest import Recorded
from tidings import Bus, Command, Context, Event

TRANSPORTS = ["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


class OrderPlaced(Event):
    order_id: str


class ChargeCard(Command):
    order_id: str


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def _database(path: Path) -> AsyncEngine:
    return sqlite_engine(path)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_trace_goes_from_the_writing_code_through_two_outboxes_and_relays(
    kind: str, tmp_path: Path, recorded: Recorded
) -> None:
    from tests.conftest import system_url

    url = system_url(kind, tmp_path)
    engines = {name: sqlite_engine(tmp_path / f"{name}.db") for name in ("shop", "ordering", "payment")}
    shop = Bus("shop", url, database=engines["shop"], telemetry=recorded.telemetry)
    ordering = Bus("ordering", url, database=engines["ordering"], telemetry=recorded.telemetry)
    payment = Bus("payment", url, database=engines["payment"], telemetry=recorded.telemetry)
    ordering.route(ChargeCard, to="payment")
    charged: list[str] = []

    @ordering.subscribe(OrderPlaced)
    async def place(event: OrderPlaced, ctx: Context) -> None:
        await ctx.send(ChargeCard(order_id=event.order_id))  # the outbox, in the handler's transaction

    @payment.handle(ChargeCard)
    async def charge(command: ChargeCard, ctx: Context) -> None:
        charged.append(command.order_id)

    for bus in (shop, ordering, payment):
        await bus.create_tables()
    tracer = recorded.telemetry.live_tracer()
    assert tracer is not None
    try:
        async with running(shop, ordering, payment):
            # The application's own span (an HTTP request, say) around its transaction.
            with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER):
                async with AsyncSession(engines["shop"]) as session, session.begin():
                    await session.execute(text("SELECT 1"))
                    await shop.publish(OrderPlaced(order_id="o-1"), session=session)
            await eventually(lambda: charged == ["o-1"], timeout=30)
            await eventually(
                lambda: any(
                    s.name.startswith("ack ") and s.name.endswith("payment") for s in recorded.spans()
                )
            )
    finally:
        for engine in engines.values():
            await engine.dispose()

    events, commands = (
        ("", "") if kind == "sqlite" else (f"{_namespace(url)}.events:", f"{_namespace(url)}.commands:")
    )
    root = recorded.one("POST /orders")
    create_event = recorded.one(f"create {events}OrderPlaced")
    assert create_event.kind is SpanKind.PRODUCER
    assert parent_of(create_event) == span_id(root)
    relay_event = recorded.one(f"publish {events}OrderPlaced")
    # The relay's send: a CLIENT span in the writer's trace, linked to the creation context.
    assert relay_event.kind is SpanKind.CLIENT
    assert parent_of(relay_event) == span_id(create_event)
    assert [link.context.span_id for link in relay_event.links] == [span_id(create_event)]
    queue = "ordering" if kind == "sqlite" else f"{_namespace(url)}.ordering"
    process_event = recorded.one(f"process {queue}")
    assert parent_of(process_event) == span_id(create_event)
    create_command = recorded.one(f"create {commands}payment")
    assert parent_of(create_command) == span_id(process_event)
    relay_command = recorded.one(f"send {commands}payment")
    assert parent_of(relay_command) == span_id(create_command)
    queue = "payment" if kind == "sqlite" else f"{_namespace(url)}.payment"
    process_command = recorded.one(f"process {queue}")
    assert parent_of(process_command) == span_id(create_command)
    traces = {span.context.trace_id for span in recorded.spans() if span.context is not None}
    assert len(traces) == 1, "the work of three services and two relays is one trace"
    # Sent is counted where the relay shipped, never where the outbox took the message.
    system = "tidings.sqlite" if kind == "sqlite" else "rabbitmq"
    assert (
        recorded.value(
            "messaging.client.sent.messages", messaging__system=system, messaging__operation__name="publish"
        )
        == 1
    )
    assert (
        recorded.value(
            "messaging.client.operation.duration",
            messaging__operation__name="create",
            messaging__operation__type="create",
            messaging__destination__name=f"{events}OrderPlaced",
        )
        == 1
    )
    if kind == "rabbitmq":
        assert relay_command.attributes is not None
        assert relay_command.attributes["messaging.system"] == "rabbitmq"
        assert relay_command.attributes["messaging.rabbitmq.destination.routing_key"] == "payment"
        assert relay_command.attributes["server.address"] == "127.0.0.1"


def _namespace(url: str) -> str:
    return url.rsplit("namespace=", 1)[1]


async def test_the_backlog_gauges_report_the_unsent_rows_and_the_oldest_ones_age(
    tmp_path: Path, recorded: Recorded
) -> None:
    engine = sqlite_engine(tmp_path / "writer.db")
    bus = Bus("writer", f"memory://{unique()}", database=engine, telemetry=recorded.telemetry)
    assert bus.relay is not None
    await bus.create_tables()
    try:
        async with bus:
            for n in range(3):
                async with AsyncSession(engine) as session, session.begin():
                    # Nobody declared "nowhere": the relay's sends are refused, the rows stay.
                    await bus.send(ChargeCard(order_id=f"o-{n}"), to="nowhere", session=session)
            assert (await bus.relay.backlog())[0] == 3
            async with running(bus):
                await eventually(lambda: bus.relay is not None and bus.relay.stats.refused >= 3)
                await eventually(lambda: bool(recorded.points("tidings.outbox.backlog")))
            assert recorded.value("tidings.outbox.backlog", tidings__service="writer") == 3
            assert recorded.value("tidings.outbox.oldest_age", tidings__service="writer") > 0
    finally:
        await engine.dispose()


async def test_a_duplicate_is_counted_and_noted_on_its_processing_span(
    tmp_path: Path, recorded: Recorded
) -> None:
    engine = sqlite_engine(tmp_path / "inbox.db")
    url = f"memory://{unique()}"
    bus = Bus("billing", url, database=engine, telemetry=recorded.telemetry)
    sender = Bus("shop", url, telemetry=recorded.telemetry)
    seen: list[object] = []

    @bus.subscribe(OrderPlaced)
    async def on_order(event: OrderPlaced, ctx: Context) -> None:
        seen.append(ctx.envelope)

    await bus.create_tables()
    try:
        async with running(bus), sender:
            await sender.publish(OrderPlaced(order_id="o-1"))
            await eventually(lambda: len(seen) == 1)
            await bus.transport.send(seen[0], "billing")  # type: ignore[arg-type]  # the same message again
            await eventually(lambda: bus.stats.duplicates == 1)
            await eventually(lambda: len(recorded.named("ack billing")) == 2)
    finally:
        await engine.dispose()
    first, second = sorted(recorded.named("process billing"), key=lambda s: s.start_time or 0)
    assert [e.name for e in first.events] == []
    assert [e.name for e in second.events] == ["tidings.duplicate"]
    assert parent_of(first) == parent_of(second)  # the same creation context: the same message
    assert recorded.value("tidings.inbox.duplicates", messaging__consumer__group__name="billing") == 1
