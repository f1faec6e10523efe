"""The RabbitMQ transport on a real broker: topology, the CloudEvents AMQP binding, settlement,
delays and dead letters. (The port's common behaviour is in tests/conformance/.)

Needs RabbitMQ on 127.0.0.1:5672 (`TIDINGS_TEST_RABBITMQ=host:port` for another broker,
`TIDINGS_TEST_RABBITMQ_NODE` for its rabbitmqctl node name) and `rabbitmqctl`, which makes a vhost
for each test module and deletes it afterwards. Skips when either is missing; fails under CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import aio_pika
import pika
import pytest

from tests.conftest import add_vhost, rabbitmqctl
from tidings.envelope import Envelope
from tidings.errors import NoRoute, PublishNotConfirmed, TransportClosed, TransportError
from tidings.transports import transport_from_url
from tidings.transports.base import Delivery
from tidings.transports.rabbitmq import RabbitMQTransport

_host, _, _port = os.environ.get("TIDINGS_TEST_RABBITMQ", "").rpartition(":")
BROKER = (_host, int(_port)) if _host else ("127.0.0.1", 5672)
#: Long enough for any delivery on a loaded machine; a test waiting this long has failed.
PATIENCE = 20.0


def unavailable(reason: str) -> NoReturn:
    """Skip: RabbitMQ is not here. Under CI, fail instead: it must be."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so RabbitMQ must be there)")
    pytest.skip(reason)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A vhost of this module's own on the test broker, deleted with everything in it after."""
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError:
        unavailable(f"RabbitMQ does not answer on {BROKER[0]}:{BROKER[1]}")
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed (the RabbitMQ tests make their vhost with it)")
    name = unique("tidings-test-")
    add_vhost(name)
    try:
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
def make_url(vhost: str) -> Callable[..., str]:
    """URLs of a fresh namespace in the module's vhost; keyword arguments become URL options."""
    namespace = unique("ns")

    def make(**options: Any) -> str:
        query = urlencode({"namespace": namespace, **options})
        return f"amqp://guest:guest@{BROKER[0]}:{BROKER[1]}/{quote(vhost, safe='')}?{query}"

    return make


@pytest.fixture
async def transport(make_url: Callable[..., str]) -> AsyncIterator[RabbitMQTransport]:
    async with RabbitMQTransport.from_url(make_url()) as opened:
        yield opened


def envelope(type: str = "Thing", *, body: bytes = b'{"n": 1}', **headers: str) -> Envelope:
    return Envelope(type=type, source="tests", body=body, headers=headers)


async def take(deliveries: AsyncIterator[Delivery], count: int = 1) -> list[Delivery]:
    """The next `count` deliveries; fails the test if they do not come."""
    async with asyncio.timeout(PATIENCE):
        return [await anext(deliveries) for _ in range(count)]


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until `check()` is true; fails the test if it does not become true."""
    async with asyncio.timeout(PATIENCE):
        while not await check():  # noqa: ASYNC110 (a broker state, not an event of ours)
            await asyncio.sleep(0.02)


def raw_connection(url: str) -> pika.BlockingConnection:
    vhost = url.split("/", 3)[3].split("?")[0]
    credentials = pika.PlainCredentials("guest", "guest")
    return pika.BlockingConnection(
        pika.ConnectionParameters(BROKER[0], BROKER[1], vhost.replace("%2F", "/"), credentials)
    )


def text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


# -- topology -----------------------------------------------------------------------------------


def listed(command: str, vhost: str, *columns: str) -> set[tuple[str, ...]]:
    """What `rabbitmqctl <command>` lists in `vhost`: a row of `columns` per entity."""
    return {tuple(line.split("\t")) for line in rabbitmqctl(command, "-p", vhost, *columns).splitlines()}


async def test_the_topology_is_the_documented_one(make_url: Callable[..., str], vhost: str) -> None:
    async with RabbitMQTransport.from_url(make_url(delivery_limit=7)) as transport:
        namespace = transport.settings.namespace
        await transport.declare_queue("basket")
        await transport.bind("basket", "PriceChanged")
        await transport.send(envelope("Later"), "basket", not_before=datetime.now(UTC) + timedelta(1))

    exchanges = listed("list_exchanges", vhost, "name", "type", "durable")
    assert {
        (f"{namespace}.events", "topic", "true"),
        (f"{namespace}.commands", "direct", "true"),
        (f"{namespace}.errors", "direct", "true"),
        (f"{namespace}.delayed", "topic", "true"),
        (f"{namespace}.delay.v2.00", "topic", "true"),
        (f"{namespace}.delay.v2.31", "topic", "true"),
    } <= exchanges
    queues = listed("list_queues", vhost, "name", "type", "durable")
    assert {
        (f"{namespace}.basket", "quorum", "true"),
        (f"{namespace}.basket.error", "quorum", "true"),
        (f"{namespace}.delay.v2.00", "quorum", "true"),
        (f"{namespace}.delay.v2.31", "quorum", "true"),
    } <= queues
    bindings = listed("list_bindings", vhost, "source_name", "destination_name", "routing_key")
    delay_prefix = "*." * 32
    assert {
        (f"{namespace}.events", f"{namespace}.basket", "PriceChanged"),
        (f"{namespace}.commands", f"{namespace}.basket", "basket"),
        (f"{namespace}.errors", f"{namespace}.basket.error", "basket"),
        (f"{namespace}.commands", f"{namespace}.basket.error", "basket.error"),
        (f"{namespace}.delayed", f"{namespace}.basket", f"{delay_prefix}q.basket"),
        (f"{namespace}.delayed", f"{namespace}.basket", f"{delay_prefix}e.PriceChanged"),
        (f"{namespace}.delay.v2.31", f"{namespace}.delay.v2.31", "1.#"),
        (f"{namespace}.delay.v2.31", f"{namespace}.delay.v2.30", "0.#"),
        (f"{namespace}.delay.v2.00", f"{namespace}.delay.v2.00", f"{'*.' * 31}1.#"),
        (f"{namespace}.delay.v2.00", f"{namespace}.delayed", f"{'*.' * 31}0.#"),
    } <= bindings

    # Declaring with exactly the documented arguments is accepted (the broker refuses a declaration
    # whose arguments differ from the queue's), so a service in another language can join.
    def declare_like_another_language() -> None:
        with raw_connection(make_url()) as connection:
            channel = connection.channel()
            channel.queue_declare(
                f"{namespace}.basket",
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 7,
                    "x-dead-letter-exchange": f"{namespace}.errors",
                    "x-dead-letter-routing-key": "basket",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            channel.queue_declare(
                f"{namespace}.delay.v2.05",
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": 32,
                    "x-dead-letter-exchange": f"{namespace}.delay.v2.04",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )

    await asyncio.to_thread(declare_like_another_language)


async def test_a_queue_that_exists_with_other_settings_is_a_clear_error(
    make_url: Callable[..., str],
) -> None:
    async with RabbitMQTransport.from_url(make_url(delivery_limit=5)) as transport:
        await transport.declare_queue("orders")
        await transport.declare_queue("orders")  # idempotent with the same settings
    async with RabbitMQTransport.from_url(make_url(queue_type="classic")) as transport:
        with pytest.raises(TransportError, match="other settings"):
            await transport.declare_queue("orders")
        await transport.declare_queue("other")  # the transport is still usable


async def test_classic_queues_on_request(make_url: Callable[..., str], vhost: str) -> None:
    async with RabbitMQTransport.from_url(make_url(queue_type="classic")) as transport:
        await transport.declare_queue("search")
        namespace = transport.settings.namespace
    queues = rabbitmqctl("list_queues", "-p", vhost, "name", "type")
    assert f"{namespace}.search\tclassic" in queues
    assert f"{namespace}.search.error\tclassic" in queues


async def test_a_temporary_queue_is_gone_when_the_transport_closes(
    make_url: Callable[..., str],
) -> None:
    async with RabbitMQTransport.from_url(make_url()) as owner:
        await owner.declare_queue("replies-1", temporary=True)
        await owner.send(envelope(), "replies-1")
        (delivery,) = await take(owner.receive("replies-1", prefetch=1))
        await delivery.ack()
    async with RabbitMQTransport.from_url(make_url()) as other:
        with pytest.raises(NoRoute):
            await other.send(envelope(), "replies-1")
        with pytest.raises(NoRoute):
            await other.send(envelope(), "replies-1.error")


# -- the CloudEvents AMQP binding ---------------------------------------------------------------


async def test_a_published_message_reads_as_a_cloudevent_in_binary_mode(
    transport: RabbitMQTransport, make_url: Callable[..., str]
) -> None:
    await transport.declare_queue("reader")
    await transport.bind("reader", "PriceChanged")
    sent = Envelope(
        type="PriceChanged",
        source="catalog",
        body=b'{"product_id": 1}',
        subject="product-1",
        correlation_id="c-1",
        headers={"x-user": "alice", "tidings-attempt": "2"},
    )
    await transport.publish(sent)

    def read_with_pika() -> tuple[Any, Any, bytes]:
        with raw_connection(make_url()) as connection:
            channel = connection.channel()
            for _ in range(200):
                method, properties, body = channel.basic_get(f"{transport.settings.namespace}.reader")
                if method is not None:
                    channel.basic_ack(method.delivery_tag)
                    return method, properties, body
                connection.sleep(0.05)
        raise AssertionError("the message never arrived")

    method, properties, body = await asyncio.to_thread(read_with_pika)
    assert method.routing_key == "PriceChanged"
    assert body == b'{"product_id": 1}'
    assert properties.content_type == "application/json"
    assert properties.message_id == sent.id
    assert properties.delivery_mode == 2  # persistent
    # x-delivery-count is the quorum queue's own.
    headers = {key: text(value) for key, value in properties.headers.items() if key != "x-delivery-count"}
    assert headers == {
        "cloudEvents_id": sent.id,
        "cloudEvents_source": "catalog",
        "cloudEvents_type": "PriceChanged",
        "cloudEvents_specversion": "1.0",
        "cloudEvents_time": sent.to_headers()["time"],
        "cloudEvents_subject": "product-1",
        "cloudEvents_correlationid": "c-1",
        "x-user": "alice",
        "tidings-attempt": "2",
    }


async def test_a_cloudevent_published_by_another_client_is_received(
    transport: RabbitMQTransport, make_url: Callable[..., str]
) -> None:
    await transport.declare_queue("billing")
    namespace = transport.settings.namespace

    def publish_with_pika() -> None:
        with raw_connection(make_url()) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                f"{namespace}.commands",
                "billing",
                b'{"order": 7}',
                pika.BasicProperties(
                    content_type="application/cloudevents+json",
                    message_id="m-7",
                    delivery_mode=2,
                    headers={
                        # Both spellings of the binding's prefix are understood.
                        "cloudEvents:id": "m-7",
                        "cloudEvents:source": "/go/ordering",
                        "cloudEvents_type": "ChargeOrder",
                        "cloudEvents_specversion": "1.0",
                        "cloudEvents_time": "2024-05-01T12:00:00Z",
                        "cloudEvents_causationid": "m-6",
                        "x-tenant": "acme",
                    },
                ),
                mandatory=True,
            )

    await asyncio.to_thread(publish_with_pika)
    (delivery,) = await take(transport.receive("billing", prefetch=1))
    received = Envelope.from_headers(delivery.headers, delivery.body)
    assert received.id == "m-7"
    assert received.source == "/go/ordering"
    assert received.type == "ChargeOrder"
    assert received.time == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert received.datacontenttype == "application/cloudevents+json"
    assert received.causation_id == "m-6"
    assert received.headers == {"x-tenant": "acme"}
    assert received.body == b'{"order": 7}'
    await delivery.ack()


# -- publishing ---------------------------------------------------------------------------------


async def test_a_message_the_broker_refuses_raises_publish_not_confirmed(
    transport: RabbitMQTransport, make_url: Callable[..., str]
) -> None:
    # A queue that takes nothing (max length 0, reject-publish) makes the broker nack the publish.
    connection = await aio_pika.connect(make_url().split("?")[0])
    async with connection:
        channel = await connection.channel()
        full = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(transport.topology.events_exchange, "Overflowing")
        with pytest.raises(PublishNotConfirmed, match="refused"):
            await transport.publish(envelope("Overflowing"))


async def test_many_publishes_are_confirmed_concurrently(transport: RabbitMQTransport) -> None:
    await transport.declare_queue("bulk")
    await asyncio.gather(*(transport.send(envelope(seq=str(i)), "bulk") for i in range(500)))
    deliveries = transport.receive("bulk", prefetch=100)
    seen = set()
    for _ in range(500):
        (delivery,) = await take(deliveries)
        seen.add(delivery.headers["seq"])
        await delivery.ack()
    assert seen == {str(i) for i in range(500)}


# -- consuming ----------------------------------------------------------------------------------


async def test_what_a_closed_iterator_gives_back_counts_as_handed_over_once(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare_queue("work")
    for i in range(5):
        await transport.send(envelope(seq=str(i)), "work")
    deliveries = transport.receive("work", prefetch=10)
    (first,) = await take(deliveries)

    # Wait until the broker has handed all five to this receiver (none left ready in the queue).
    async def all_handed_over() -> bool:
        return await _ready_count(transport, "work") == 0

    await eventually(all_handed_over)
    # (That they come back at all is the port's: tests/conformance/test_transport.py. Here the broker
    # surely holds them for this receiver, and counts the handing over.)
    await deliveries.aclose()  # type: ignore[attr-defined]
    await first.ack()  # a yielded delivery can still be settled after the iterator closed

    again = transport.receive("work", prefetch=10)
    rest = await take(again, 4)
    assert sorted(d.headers["seq"] for d in rest) == ["1", "2", "3", "4"]
    assert all(d.delivery_count == 2 for d in rest)  # they were handed over once before


async def _ready_count(transport: RabbitMQTransport, queue: str) -> int:
    channel = await transport.connection().channel()
    try:
        declared = await channel.declare_queue(transport.topology.queue(queue), passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


async def test_a_message_delivered_over_the_limit_is_moved_to_the_error_queue_by_the_broker(
    make_url: Callable[..., str],
) -> None:
    url = make_url(delivery_limit=2)
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("fragile")
        await transport.send(envelope(), "fragile")
    counts = []
    for _ in range(3):
        # The process "dies" holding the message: the connection closes with it unsettled.
        async with RabbitMQTransport.from_url(url) as transport:
            (delivery,) = await take(transport.receive("fragile", prefetch=1))
            counts.append(delivery.delivery_count)
    assert counts == [1, 2, 3]
    async with RabbitMQTransport.from_url(url) as transport:

        async def moved() -> bool:
            return bool(await transport.dead_letters("fragile"))

        await eventually(moved)
        (letter,) = await transport.dead_letters("fragile")
        assert letter.headers["tidings-fault-reason"] == "delivery-limit"
        assert letter.headers["type"] == "Thing"


async def test_a_classic_queue_counts_a_redelivery(make_url: Callable[..., str]) -> None:
    url = make_url(queue_type="classic")
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("work")
        await transport.send(envelope(), "work")
        (delivery,) = await take(transport.receive("work", prefetch=1))
        assert delivery.delivery_count == 1
    async with RabbitMQTransport.from_url(url) as transport:
        (delivery,) = await take(transport.receive("work", prefetch=1))
        assert delivery.delivery_count == 2
        await delivery.ack()


async def test_closing_the_transport_ends_its_receivers(transport: RabbitMQTransport) -> None:
    await transport.declare_queue("work")
    deliveries = transport.receive("work", prefetch=1)
    waiting = asyncio.ensure_future(anext(deliveries))
    await asyncio.sleep(0.1)  # let it start waiting
    await transport.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(waiting, PATIENCE)
    with pytest.raises(TransportClosed):
        await transport.send(envelope(), "work")
    with pytest.raises(TransportClosed):
        await transport.declare_queue("work")


async def test_a_receiver_whose_queue_is_deleted_raises_transport_error(
    transport: RabbitMQTransport,
) -> None:
    await transport.declare_queue("doomed")
    deliveries = transport.receive("doomed", prefetch=1)
    await transport.send(envelope(), "doomed")
    (first,) = await take(deliveries)
    await first.ack()
    waiting = asyncio.ensure_future(anext(deliveries))
    channel = await transport.connection().channel()
    await channel.queue_delete(transport.topology.queue("doomed"))
    await channel.close()
    with pytest.raises(TransportError, match="cancelled the consumer"):
        await asyncio.wait_for(waiting, PATIENCE)


async def test_acks_of_deliveries_settled_out_of_order_all_count(transport: RabbitMQTransport) -> None:
    await transport.declare_queue("work")
    for seq in range(20):
        await transport.send(envelope(seq=str(seq)), "work")
    deliveries = transport.receive("work", prefetch=20)
    held = await take(deliveries, 20)
    for delivery in held[1::2] + held[::2]:  # odd ones first, then the even ones
        await delivery.ack()
    # Twice, past the delivery's own guard: still nothing (a second AMQP ack of a tag is a channel
    # error: the broker would close the channel and give back everything on it).
    settlements = held[0]._acks  # type: ignore[attr-defined]
    await settlements.ack(held[0]._tag)  # type: ignore[attr-defined]
    await transport.send(envelope(seq="after"), "work")
    (after,) = await take(deliveries)
    assert after.headers["seq"] == "after"
    await after.ack()
    assert settlements.is_open  # the very channel the 20 came on: never closed
    await deliveries.aclose()
    channel = await transport.connection().channel()
    declared = await channel.declare_queue(transport.topology.queue("work"), passive=True)
    assert declared.declaration_result.message_count == 0
    await channel.close()


# -- delays -------------------------------------------------------------------------------------


async def test_a_delay_longer_than_the_cascade_goes_round_again(
    transport: RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real cascade reaches 49.7 days; shrink what the transport believes it reaches.
    monkeypatch.setattr("tidings.transports.rabbitmq.transport.MAX_DELAY_MS", 150)
    await transport.declare_queue("patient")
    due = datetime.now(UTC) + timedelta(seconds=0.8)
    sent = envelope()
    await transport.send(sent, "patient", not_before=due)
    (delivery,) = await take(transport.receive("patient", prefetch=1))
    assert datetime.now(UTC) >= due
    assert delivery.headers == sent.to_headers()  # the due-time header stays on the wire
    await delivery.ack()


# -- the URL ------------------------------------------------------------------------------------


async def test_the_url_names_the_transport(make_url: Callable[..., str]) -> None:
    transport = transport_from_url(make_url())
    assert isinstance(transport, RabbitMQTransport)
    assert "guest:***@" in transport.url
    assert ":guest@" not in transport.url
