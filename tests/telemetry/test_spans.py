"""Spans by the OpenTelemetry messaging conventions: producer, consumer and settle spans, their
parents and links, attributes, and retries and dead letters as events (memory transport)."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.telemetry.conftest import Recorded
from tidings import Bus, Command, Context, Envelope, Event, Reject, Reply, RetryPolicy
from tidings.telemetry import current_trace_ids, trace_ids


class Ping(Event):
    n: int


class Ask(Command):
    n: int


class Answer(Reply):
    n: int


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def test_a_published_event_is_a_producer_span_and_its_handling_a_consumer_span_under_it(
    recorded: Recorded,
) -> None:
    url = f"memory://{unique()}"
    producer = Bus("shop", url, telemetry=recorded.telemetry)
    consumer = Bus("mailer", url, telemetry=recorded.telemetry)
    seen: list[str | None] = []

    @consumer.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        ids = current_trace_ids()
        seen.append(ids.span_id if ids else None)

    async with running(consumer), producer:
        await producer.publish(Ping(n=1), correlation_id="conversation-1")
        await eventually(lambda: consumer.stats.handled == 1)
        await eventually(lambda: len(recorded.named("ack mailer")) == 1)

    publish = recorded.one("publish Ping")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.attributes is not None
    assert dict(publish.attributes) == {
        "messaging.system": "tidings.memory",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "Ping",
        "messaging.message.id": publish.attributes["messaging.message.id"],
        "messaging.message.conversation_id": "conversation-1",
        "messaging.message.body.size": len(b'{"n":1}'),
        "tidings.message.type": "Ping",
    }
    process = recorded.one("process mailer")
    assert process.kind is SpanKind.CONSUMER
    # The creation context is the parent, and a link, as the conventions have it for one message.
    assert parent_of(process) == span_id(publish)
    assert process.context is not None
    assert publish.context is not None
    assert process.context.trace_id == publish.context.trace_id
    assert [link.context.span_id for link in process.links] == [span_id(publish)]
    assert process.attributes is not None
    assert process.attributes["messaging.consumer.group.name"] == "mailer"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.message.id"] == publish.attributes["messaging.message.id"]
    assert process.attributes["messaging.message.conversation_id"] == "conversation-1"
    assert process.status.status_code is StatusCode.UNSET
    assert "error.type" not in process.attributes
    # The handler ran inside the consumer span; the ack is a settle span under it.
    assert seen == [f"{span_id(process):016x}"]
    ack = recorded.one("ack mailer")
    assert ack.kind is SpanKind.CLIENT
    assert parent_of(ack) == span_id(process)
    assert ack.attributes is not None
    assert ack.attributes["messaging.operation.type"] == "settle"


async def test_a_request_its_send_the_handling_and_the_reply_form_one_tree(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    client = Bus("client", url, telemetry=recorded.telemetry)
    server = Bus("server", url, telemetry=recorded.telemetry)
    client.route(Ask, to="server")

    @server.handle(Ask)
    async def answer(command: Ask, ctx: Context) -> Answer:
        await ctx.publish(Ping(n=command.n))  # an event in the same conversation
        return Answer(n=command.n)

    async with running(server), client:
        reply = await client.request(Ask(n=7), expect=Answer, timeout=5)
        assert reply.n == 7
        await eventually(lambda: len(recorded.named("ack server")) == 1)
        await eventually(lambda: len(recorded.named("ack client.replies.{instance}")) == 1)

    request = recorded.one("request server")
    assert request.parent is None
    assert request.kind is SpanKind.INTERNAL
    send = recorded.one("send server")
    assert send.kind is SpanKind.PRODUCER
    assert parent_of(send) == span_id(request)
    handled = [s for s in recorded.named("process server") if parent_of(s) == span_id(send)]
    assert len(handled) == 1
    under_handler = {s.name for s in recorded.children(handled[0])}
    # The reply goes to the asking instance's temporary queue: named by its template.
    assert under_handler == {"publish Ping", "send client.replies.{instance}", "ack server"}
    reply_send = recorded.one("send client.replies.{instance}")
    assert reply_send.attributes is not None
    assert reply_send.attributes["messaging.destination.template"] == "client.replies.{instance}"
    assert reply_send.attributes["messaging.destination.temporary"] is True
    assert reply_send.attributes["messaging.destination.name"] == client.reply_queue
    reply_process = recorded.one("process client.replies.{instance}")
    assert parent_of(reply_process) == span_id(reply_send)
    assert reply_process.attributes is not None
    assert "messaging.consumer.group.name" not in reply_process.attributes  # one instance's own queue
    traces = {s.context.trace_id for s in recorded.spans() if s.context is not None}
    assert len(traces) == 1


async def test_a_failed_attempt_a_delayed_retry_and_its_second_delivery(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("flaky", url, telemetry=recorded.telemetry, retry=RetryPolicy(immediate=1, delays=(0.01,)))
    calls: list[int] = []

    class ProviderDown(Exception):
        pass

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt <= 2:
            raise ProviderDown("try later")

    async with running(bus):
        await bus.publish(Ping(n=1))
        await eventually(lambda: bus.stats.handled == 1)
        await eventually(lambda: len(recorded.named("ack flaky")) == 1)

    assert calls == [1, 2, 3]
    publish = recorded.one("publish Ping")
    first, second = sorted(recorded.named("process flaky"), key=lambda s: s.start_time or 0)
    # Both deliveries continue the message's creation context.
    assert parent_of(first) == parent_of(second) == span_id(publish)
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["error.type"] == f"{ProviderDown.__module__}.{ProviderDown.__qualname__}"
    assert first.status.status_code is StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception", "exception", "tidings.retry_scheduled"]
    assert first.events[0].attributes is not None
    assert first.events[0].attributes["tidings.attempt"] == 1
    retry = first.events[2].attributes
    assert retry is not None
    assert retry["tidings.retry.reason"] == "handler-failed"
    assert [s.name for s in recorded.children(first)] == ["retry flaky"]
    assert "error.type" not in second.attributes
    assert [s.name for s in recorded.children(second)] == ["ack flaky"]


async def test_dead_letters_carry_their_reason_code(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("strict", url, telemetry=recorded.telemetry)

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        raise Reject("not for us")

    async with running(bus):
        await bus.publish(Ping(n=1))
        # A body the model cannot be built from: dead-lettered without a handler call.
        await bus.transport.send(Envelope(type="Ping", source="elsewhere", body=b'{"n":"x"}'), "strict")
        await eventually(lambda: bus.stats.dead_lettered == 2)
        await eventually(lambda: len(recorded.named("dead_letter strict")) == 2)

    reasons = {}
    for span in recorded.named("process strict"):
        assert span.status.status_code is StatusCode.ERROR
        (event,) = [e for e in span.events if e.name == "tidings.dead_lettered"]
        assert event.attributes is not None
        assert span.attributes is not None
        reasons[event.attributes["tidings.fault.reason"]] = span.attributes["error.type"]
        assert [s.name for s in recorded.children(span)] == ["dead_letter strict"]
    assert reasons == {
        "rejected": "tidings.errors.Reject",
        "invalid-payload": "pydantic_core._pydantic_core.ValidationError",
    }


async def test_a_creation_context_the_application_gives_is_kept_and_linked(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("linked", url, telemetry=recorded.telemetry)
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    received: list[str | None] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        received.append(ctx.headers.get("traceparent"))

    async with running(bus):
        await bus.publish(Ping(n=1), headers={"traceparent": theirs})
        await eventually(lambda: bus.stats.handled == 1)

    assert received == [theirs]
    send = recorded.one("publish Ping")
    assert send.kind is SpanKind.CLIENT  # not the creation context: the application's is
    assert [f"{link.context.span_id:016x}" for link in send.links] == ["b7ad6b7169203331"]
    process = recorded.one("process linked")
    assert process.parent is not None
    assert f"{process.parent.span_id:016x}" == "b7ad6b7169203331"
    assert process.context is not None
    assert f"{process.context.trace_id:032x}" == theirs.split("-")[1]


async def test_trace_ids_come_from_the_current_span_else_from_the_message(recorded: Recorded) -> None:
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    ids = trace_ids(headers)
    assert ids is not None
    assert ids.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ids.traceparent == headers["traceparent"]
    assert trace_ids({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}) is None
    assert trace_ids({"traceparent": "garbage"}) is None
    url = f"memory://{unique()}"
    bus = Bus("ids", url, telemetry=recorded.telemetry)
    inside: list[str] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        found = trace_ids(ctx.headers)
        assert found is not None
        inside.append(found.trace_id)

    async with running(bus):
        await bus.publish(Ping(n=1))
        await eventually(lambda: bus.stats.handled == 1)
    publish = recorded.one("publish Ping")
    assert publish.context is not None
    assert inside == [f"{publish.context.trace_id:032x}"]


async def test_telemetry_false_records_nothing(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("quiet", url, telemetry=False)

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        assert current_trace_ids() is None

    async with running(bus):
        await bus.publish(Ping(n=1))
        await eventually(lambda: bus.stats.handled == 1)
        await asyncio.sleep(0.05)
    assert recorded.spans() == ()
