"""Metrics by the OpenTelemetry messaging conventions, and tidings' own, read with the SDK's
InMemoryMetricReader (memory transport)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.telemetry.conftest import Recorded
from tidings import Bus, Command, Context, Envelope, Event, Reply, RequestTimeout, Retry, RetryPolicy
from tidings.telemetry.otel import DURATION_BUCKETS


class Ping(Event):
    n: int


class Slow(Command):
    seconds: float


class Done(Reply):
    pass


async def test_the_conventions_metrics_with_their_attributes(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("counted", url, telemetry=recorded.telemetry)

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        pass

    async with running(bus):
        for n in range(3):
            await bus.publish(Ping(n=n))
        await eventually(lambda: bus.stats.handled == 3)
        await asyncio.sleep(0.05)  # the last ack's span and duration are recorded after `handled`

    common = {"messaging.system": "tidings.memory"}
    sent = recorded.points("messaging.client.sent.messages")
    assert sent == [
        ({**common, "messaging.destination.name": "Ping", "messaging.operation.name": "publish"}, 3)
    ]
    consumed = recorded.points("messaging.client.consumed.messages")
    consumer = {**common, "messaging.destination.name": "counted", "messaging.consumer.group.name": "counted"}
    assert consumed == [({**consumer, "messaging.operation.name": "process"}, 3)]
    process = recorded.points("messaging.process.duration")
    assert process == [
        ({**consumer, "messaging.operation.name": "process", "messaging.operation.type": "process"}, 3)
    ]
    durations = {
        (attrs["messaging.operation.name"], attrs["messaging.operation.type"]): count
        for attrs, count in recorded.points("messaging.client.operation.duration")
    }
    assert durations == {("publish", "send"): 3, ("ack", "settle"): 3}
    # The buckets the conventions advise.
    data = recorded.reader.get_metrics_data()
    assert data is not None
    (histogram,) = [
        m
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "messaging.process.duration"
    ]
    assert tuple(histogram.data.data_points[0].explicit_bounds) == DURATION_BUCKETS
    assert histogram.unit == "s"


async def test_retries_and_dead_letters_by_reason(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    bus = Bus("picky", url, telemetry=recorded.telemetry, retry=RetryPolicy(immediate=0, delays=(0.01,)))
    asked_again: list[int] = []

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        if event.n == 1 and not asked_again:
            asked_again.append(1)
            raise Retry(0.01)  # the handler asks for later
        if event.n == 2:
            raise ValueError("never works")  # a delayed retry, then the error queue

    async with running(bus):
        await bus.publish(Ping(n=1))
        await bus.publish(Ping(n=2))
        await bus.transport.send(Envelope(type="Unknown", source="x", body=b"{}"), "picky")
        await eventually(lambda: bus.stats.dead_lettered == 2 and bus.stats.handled == 1)
        await asyncio.sleep(0.05)

    retries = {
        attrs["tidings.retry.reason"]: value for attrs, value in recorded.points("tidings.retries.scheduled")
    }
    assert retries == {"retry-requested": 1, "handler-failed": 1}
    dead = {attrs["tidings.fault.reason"]: value for attrs, value in recorded.points("tidings.dead_letters")}
    assert dead == {"handler-failed": 1, "unknown-type": 1}
    for attrs, _ in recorded.points("tidings.dead_letters"):
        assert attrs["messaging.consumer.group.name"] == "picky"
    failed = {
        attrs.get("error.type"): count for attrs, count in recorded.points("messaging.process.duration")
    }
    assert failed == {None: 2, "ValueError": 2, "unknown-type": 1}


async def test_request_timeouts_and_late_replies(recorded: Recorded) -> None:
    url = f"memory://{unique()}"
    client = Bus("asker", url, telemetry=recorded.telemetry)
    server = Bus("slowpoke", url, telemetry=recorded.telemetry)
    client.route(Slow, to="slowpoke")

    @server.handle(Slow)
    async def slow(command: Slow, ctx: Context) -> Done:
        await asyncio.sleep(command.seconds)
        return Done()

    async with running(server), client:
        with pytest.raises(RequestTimeout):
            await client.request(Slow(seconds=0.3), expect=Done, timeout=0.05)
        await eventually(lambda: client.late_replies == 1)

    (request,) = recorded.named("request slowpoke")
    assert request.attributes is not None
    assert request.attributes["error.type"] == "tidings.errors.RequestTimeout"
    assert recorded.value("tidings.requests.timeouts", messaging__destination__name="slowpoke") == 1
    assert (
        recorded.value(
            "tidings.requests.late_replies", messaging__destination__template="asker.replies.{instance}"
        )
        == 1
    )
    (late,) = recorded.named("process asker.replies.{instance}")
    assert [event.name for event in late.events] == ["tidings.late_reply"]
