"""The RabbitMQ transport under hostile conditions: settlements whose copy cannot be stored, foreign
headers of any shape, delays whose target is missing when they are due, passwords with `@` and
`/`, and dead letters stored twice.

Most tests run on the shared broker, each in a namespace of its own (`rabbitmq_url`). Those that
raise an alarm or need the dead-letter worker to retry quickly run on a private node (the
module-scoped `private_broker` of `tests/transports/private_rabbitmq.py`), never on the shared
broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import rabbitmqctl, session_vhost, unique
from tests.helpers import eventually, running
from tests.recoverability.app import Job
from tests.transports.private_rabbitmq import PrivateBroker, private_broker
from tidings import Bus, Context, DeadLetters, Reject, RetryPolicy
from tidings.cli.dead_letters import run_command_async
from tidings.envelope import Envelope, new_message_id
from tidings.errors import ConnectionFailed
from tidings.messages import wire_name_of
from tidings.transports.rabbitmq import RabbitMQTransport
from tidings.transports.rabbitmq.settings import RabbitMQSettings
from tidings.transports.rabbitmq.topology import DELAY_LEVELS, Topology

__all__ = ["private_broker"]  # the module-scoped fixture, used by name below

pytestmark = pytest.mark.rabbitmq

PATIENCE = 30.0


def physical(url: str, name: str) -> str:
    """The RabbitMQ name of the port's queue `name` in the system `url` names."""
    return Topology(RabbitMQSettings.from_url(url)).queue(name)


def pika_channel(url: str) -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(RabbitMQSettings.from_url(url).broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def job_headers() -> dict[str, Any]:
    """The AMQP headers of a valid `Job` command from a foreign publisher."""
    return {
        "cloudEvents_id": new_message_id(),
        "cloudEvents_source": "foreign",
        "cloudEvents_type": wire_name_of(Job),
        "cloudEvents_specversion": "1.0",
    }


@contextlib.asynccontextmanager
async def error_queue_bodies(url: str, queue: str) -> AsyncIterator[list[bytes]]:
    """The bodies arriving in `queue`'s error queue, read (and acked) by a plain AMQP consumer."""
    import aiormq

    bodies: list[bytes] = []
    connection = await aiormq.connect(RabbitMQSettings.from_url(url).broker_url)
    try:
        channel = await connection.channel()

        async def on_message(message: Any) -> None:
            bodies.append(message.body)

        await channel.basic_consume(physical(url, f"{queue}.error"), on_message, no_ack=True)
        yield bodies
    finally:
        await connection.close()


def numbers(bodies: list[bytes]) -> set[int]:
    return {json.loads(body)["n"] for body in bodies}


# -- 1. a failed settle ---------------------------------------------------------------------------


async def test_a_failed_settle_does_not_stall_the_consumer(rabbitmq_url: str) -> None:
    """An operator deletes the error queue: dead letters still go somewhere, good messages flow."""
    service = unique("settle-")
    bus = Bus(service, rabbitmq_url, prefetch=2, concurrency=2, retry=RetryPolicy.none())
    handled: list[int] = []

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        if job.note == "bad":
            raise Reject("bad job")
        handled.append(job.n)

    async with running(bus):
        connection, channel = await asyncio.to_thread(pika_channel, rabbitmq_url)
        try:
            await asyncio.to_thread(channel.queue_delete, physical(rabbitmq_url, f"{service}.error"))
        finally:
            await asyncio.to_thread(connection.close)
        for n in range(5):  # more failing settlements than the prefetch
            await bus.send(Job(n=n, note="bad"))
        for n in range(100, 103):
            await bus.send(Job(n=n))
        await eventually(lambda: sorted(handled) == [100, 101, 102], timeout=PATIENCE)
        await eventually(lambda: bus.stats.dead_lettered == 5, timeout=PATIENCE)
        failed = await DeadLetters(bus.transport, service).list()
    # Nothing lost: every bad job is in the (declared again) error queue.
    assert sorted(json.loads(f.body)["n"] for f in failed) == [0, 1, 2, 3, 4]
    assert {f.fault.reason for f in failed} == {"rejected"}


async def test_a_settle_that_fails_during_an_alarm_gives_the_message_back(
    private_broker: PrivateBroker,
) -> None:
    """Copies cannot be stored during a memory alarm; afterwards the consumer carries on."""
    url = private_broker.url(namespace=unique("alarm"), publish_timeout="1")
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("svc")
        for n in range(4):
            await transport.send(Envelope(type="Job", source="t", body=json.dumps({"n": n}).encode()), "svc")
        dead: list[int] = []
        failures: list[BaseException] = []

        async def consume() -> None:
            async for delivery in transport.receive("svc", prefetch=2):
                try:
                    await delivery.dead_letter({**delivery.headers, "tidings-fault-reason": "test"})
                except Exception as error:  # the copy was not confirmed: the message went back
                    failures.append(error)
                    continue
                dead.append(json.loads(delivery.body)["n"])

        private_broker.ctl("set_vm_memory_high_watermark", "0")
        task = asyncio.create_task(consume())
        try:
            await eventually(lambda: len(failures) >= 2, timeout=PATIENCE)
        finally:
            private_broker.ctl("set_vm_memory_high_watermark", "0.4")
        try:
            # Before the fix the two deliveries stayed unsettled on the live channel, and with
            # prefetch=2 nothing more arrived, alarm or not.
            await eventually(lambda: sorted(dead) == [0, 1, 2, 3], timeout=PATIENCE)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- 2. foreign headers ---------------------------------------------------------------------------


async def test_one_foreign_header_does_not_kill_the_consumer_loop(rabbitmq_url: str) -> None:
    """A 400-digit `x-tidings-due` (and a timestamp past 9999, which pamqp cannot even decode)."""
    service = unique("hdr-")
    bus = Bus(service, rabbitmq_url)
    handled: list[int] = []

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        handled.append(job.n)

    async with running(bus), error_queue_bodies(rabbitmq_url, service) as dead:
        connection, channel = await asyncio.to_thread(pika_channel, rabbitmq_url)
        try:
            for n, properties in (
                (1, pika.BasicProperties(headers={**job_headers(), "x-tidings-due": "9" * 400})),
                (2, pika.BasicProperties(headers=job_headers(), timestamp=2**63 - 1)),
            ):
                body = json.dumps({"n": n}).encode()
                await asyncio.to_thread(
                    channel.basic_publish, "", physical(rabbitmq_url, service), body, properties
                )
        finally:
            await asyncio.to_thread(connection.close)
        await bus.send(Job(n=3))
        await eventually(lambda: 3 in handled and 1 in numbers(dead), timeout=PATIENCE)
        await eventually(lambda: 2 in handled, timeout=PATIENCE)  # an odd timestamp is harmless


def _odd_values() -> st.SearchStrategy[Any]:
    """Values of every AMQP field type pika writes (not floats), and strings that look like
    numbers but are not usable ones."""
    scalars = st.one_of(
        st.text(max_size=30),
        st.sampled_from(
            ["", "nan", "NaN", "-inf", "1e999", "-1", "0", "\uff11\uff12", "9" * 400, "9" * 5000]
        ),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6),
        st.binary(max_size=20),
        st.booleans(),
        st.none(),
        st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9999, 1, 1)),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            # Keys as bytes too: pika writes them as they are, so a key need not be UTF-8.
            st.dictionaries(
                st.one_of(st.text(min_size=1, max_size=8), st.binary(min_size=1, max_size=8)),
                inner,
                max_size=3,
            ),
        ),
        max_leaves=5,
    )


#: Every header tidings reads from the wire, on the transport's side and above it.
_READ_HEADERS = (
    "x-tidings-due",
    "x-delivery-count",
    "x-acquired-count",
    "cloudEvents_id",
    "cloudEvents_source",
    "cloudEvents_type",
    "cloudEvents_specversion",
    "cloudEvents_time",
    "cloudEvents:type",
    "cloudEvents_datacontenttype",
    "tidings-attempt",
    "tidings-fault-first-time",
)


def _future_due(value: Any) -> bool:
    """A usable due time still ahead: such a message goes round the delay cascade, for days."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value > time.time() * 1000


_short_text = st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=40))
_foreign_messages = st.fixed_dictionaries(
    {
        "headers": st.dictionaries(st.sampled_from(_READ_HEADERS), _odd_values(), max_size=4).filter(
            lambda headers: not _future_due(headers.get("x-tidings-due"))
        ),
        "drop": st.sets(st.sampled_from(["cloudEvents_id", "cloudEvents_type"]), max_size=1),
        "timestamp": st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
        "priority": st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
        "expiration": st.one_of(st.none(), st.integers(min_value=60_000, max_value=10**9).map(str)),
        "message_id": _short_text,
        "content_type": st.one_of(st.none(), st.just("application/json"), st.text(max_size=20)),
        "correlation_id": _short_text,
        "type": _short_text,
    }
)


async def test_any_foreign_header_ends_handled_or_dead_lettered(rabbitmq_url: str) -> None:
    service = unique("fuzz-")
    bus = Bus(service, rabbitmq_url, retry=RetryPolicy.none())
    handled: list[int] = []

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        handled.append(job.n)

    loop = asyncio.get_running_loop()
    counter = iter(range(1_000_000))
    async with running(bus), error_queue_bodies(rabbitmq_url, service) as dead:
        connection, channel = await asyncio.to_thread(pika_channel, rabbitmq_url)

        @settings(
            max_examples=50,
            database=None,  # nothing written into the working tree
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(message=_foreign_messages)
        def check(message: dict[str, Any]) -> None:
            n = next(counter)
            headers = {**job_headers(), **message["headers"]}
            for key in message["drop"]:
                headers.pop(key, None)
            properties = pika.BasicProperties(
                headers=headers,
                timestamp=message["timestamp"],
                priority=message["priority"],
                expiration=message["expiration"],
                message_id=message["message_id"],
                content_type=message["content_type"],
                correlation_id=message["correlation_id"],
                type=message["type"],
                delivery_mode=2,
            )
            body = json.dumps({"n": n}).encode()
            channel.basic_publish("", physical(rabbitmq_url, service), body, properties, mandatory=True)

            async def settled() -> None:
                await eventually(lambda: n in handled or n in numbers(dead), timeout=PATIENCE)

            asyncio.run_coroutine_threadsafe(settled(), loop).result()

        try:
            await asyncio.to_thread(check)
        finally:
            await asyncio.to_thread(connection.close)
        await bus.send(Job(n=10_000_000))  # and the consumer is still going
        await eventually(lambda: 10_000_000 in handled, timeout=PATIENCE)


# -- 3. the delay cascade -------------------------------------------------------------------------


async def test_the_delay_queues_dead_letter_at_least_once(rabbitmq_url: str) -> None:
    async with RabbitMQTransport.from_url(rabbitmq_url) as transport:
        await transport.declare_queue("svc")
        await transport.send(
            Envelope(type="Later", source="t", body=b"{}"),
            "svc",
            not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        )
        names = {transport.topology.delay_level(level) for level in range(DELAY_LEVELS)}
    rows = rabbitmqctl("list_queues", "-p", session_vhost(), "name", "type", "arguments").splitlines()
    delay_queues = {row.split("\t")[0]: row.split("\t")[1:] for row in rows if row.split("\t")[0] in names}
    assert delay_queues.keys() == names
    for kind, arguments in delay_queues.values():
        assert kind == "quorum"
        assert '{"x-dead-letter-strategy","at-least-once"}' in arguments
        assert '{"x-overflow","reject-publish"}' in arguments


async def test_a_delayed_message_whose_target_is_missing_when_due_is_not_lost(
    private_broker: PrivateBroker,
) -> None:
    """The target queue is gone when the message is due (an operator deleted it, a redeploy is
    declaring it again): the message arrives once the queue is back. A classic delay queue had
    dropped it, unroutable, at that instant."""
    url = private_broker.url(namespace=unique("gone"))
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("svc")
        due = time.monotonic() + 2.5
        await transport.send(
            Envelope(type="Later", source="t", body=b"{}"),
            "svc",
            not_before=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2.5),
        )
        connection, channel = await asyncio.to_thread(pika_channel, url)
        try:
            await asyncio.to_thread(channel.queue_delete, physical(url, "svc"))
        finally:
            await asyncio.to_thread(connection.close)
        assert time.monotonic() < due, "too slow to delete the queue before the message is due"
        # Let the due time pass while there is no queue to take the message.
        await asyncio.sleep(due - time.monotonic() + 1.0)
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("svc")
        deliveries = transport.receive("svc", prefetch=1)
        async with asyncio.timeout(PATIENCE):
            later = await anext(deliveries)
        assert later.headers["type"] == "Later"
        await later.ack()
        await deliveries.aclose()


# -- 4. passwords in URLs -------------------------------------------------------------------------

#: Pieces of the password below: none of them may show anywhere.
_SECRETS = ("Zq9", "Xk7", "Wm4")


@pytest.mark.parametrize(
    "url",
    [
        "amqp://user:Zq9%40Xk7%2FWm4@127.0.0.1:1/",  # percent-encoded, as it should be
        "amqp://user:Zq9@Xk7/Wm4@127.0.0.1:1/",  # a raw '@' and '/': the host looks like "Xk7"
        "amqp://user:Zq9@Xk7@127.0.0.1:1/",  # a raw '@' only
        "amqp://user:Zq9Xk7/Wm4@127.0.0.1:1/",  # a raw '/' only
    ],
)
async def test_a_password_with_at_or_slash_never_leaks(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []

    async def connect() -> None:
        transport = RabbitMQTransport.from_url(f"{url}?connect_timeout=2")
        shown.extend((repr(transport), transport.url))
        await transport.open()

    with pytest.raises(ConnectionFailed) as failure:
        await connect()
    shown += [str(failure.value), repr(failure.value), caplog.text]
    for text in shown:
        for secret in _SECRETS:
            assert secret not in text, text


# -- 5. a dead letter stored twice ----------------------------------------------------------------


async def test_a_dead_letter_stored_twice_is_listed_and_replayed_once(rabbitmq_url: str) -> None:
    async with RabbitMQTransport.from_url(rabbitmq_url) as transport:
        await transport.declare_queue("svc")
        twice = Envelope(type="Job", source="t", body=b'{"n": 1}')
        other = Envelope(type="Job", source="t", body=b'{"n": 2}')
        # Stored, then the process died before acking the original, which failed again.
        for envelope, reason in ((twice, "first"), (other, "other"), (twice, "second")):
            fault = {"tidings-fault-reason": reason}
            await transport.send(dataclasses.replace(envelope, headers=fault), "svc.error")
        dead_letters = DeadLetters(transport, "svc")
        listed = await dead_letters.list()
        assert [(f.id, f.fault.reason) for f in listed] == [(twice.id, "first"), (other.id, "other")]

        class Args:
            transport = rabbitmq_url
            service = "svc"
            json = True
            action = "list"
            limit = 100

        out = _Output()
        assert await run_command_async(Args(), out) == 0  # type: ignore[arg-type]
        assert [row["id"] for row in json.loads(out.text)] == [twice.id, other.id]

        assert await dead_letters.replay([twice.id]) == 1
        # Both copies left the error queue; the other dead letter stays.
        assert [letter.message_id for letter in await transport.dead_letters("svc")] == [other.id]
        deliveries = transport.receive("svc", prefetch=10)
        async with asyncio.timeout(PATIENCE):
            replayed = await anext(deliveries)
        assert replayed.headers["id"] == twice.id
        await replayed.ack()
        await deliveries.aclose()
        assert await transport.purge_dead_letters("svc") == 1


class _Output:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)
