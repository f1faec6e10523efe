"""The RabbitMQ transport recovers from lost connections and broker restarts by itself.

The stream tests disrupt a flow of 5,000 commands with `rabbitmqctl`: closing the connections of
this module's vhost, and stopping and starting the broker's app (which every user of that broker
notices: point `TIDINGS_TEST_RABBITMQ` and `TIDINGS_TEST_RABBITMQ_NODE` at a broker of your own
to keep it to yourself). The proxy tests put a TCP proxy between transport and broker to drop the
connection at chosen moments.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.transports import test_rabbitmq as common
from tests.transports.test_rabbitmq import BROKER, PATIENCE, envelope, rabbitmqctl, take
from tidings.errors import PublishNotConfirmed
from tidings.transports.rabbitmq import RabbitMQTransport

# The same fixtures as test_rabbitmq: this module's own vhost, URLs of a fresh namespace in it.
vhost = common.vhost
make_url = common.make_url

STREAM = 5_000
#: The issue's bound: publishers and consumers work again this soon after the broker is back.
RECOVERY = 10.0


async def stream_through(url: str, disrupt: Callable[[], Awaitable[None]]) -> None:
    """Send STREAM commands while receiving them; `disrupt` the broker a fifth of the way in.

    A publisher that gets `PublishNotConfirmed` publishes again, as the port asks of callers.
    Asserts that every message arrives (duplicates are allowed) and that both sides make progress
    within RECOVERY seconds of `disrupt` returning.
    """
    async with (
        RabbitMQTransport.from_url(url) as producer,
        RabbitMQTransport.from_url(url) as consumer,
    ):
        await producer.declare_queue("stream")
        reconnected: list[str] = []
        for name, transport in (("producer", producer), ("consumer", consumer)):
            transport.connection().reconnect_callbacks.add(lambda *_, name=name: reconnected.append(name))
        confirmed = 0
        received: set[int] = set()
        unconfirmed = 0

        async def send(seq: int, window: asyncio.Semaphore) -> None:
            nonlocal confirmed, unconfirmed
            async with window:
                while True:
                    try:
                        await producer.send(envelope(seq=str(seq)), "stream")
                    except PublishNotConfirmed:
                        unconfirmed += 1
                        continue  # publish again: at-least-once
                    confirmed += 1
                    return

        async def produce() -> None:
            window = asyncio.Semaphore(200)  # confirms in flight at once
            sending = []
            for seq in range(STREAM):
                sending.append(asyncio.create_task(send(seq, window)))
                if seq % 50 == 49:
                    # At most ~500/s: the stream must still flow when `disrupt` lands, and
                    # rabbitmqctl takes seconds to start; a fast broker would be done before.
                    await asyncio.sleep(0.1)
            await asyncio.gather(*sending)

        async def consume() -> None:
            async for delivery in consumer.receive("stream", prefetch=200):
                received.add(int(delivery.headers["seq"]))
                await delivery.ack()
                if len(received) == STREAM:
                    return

        async def progress(measure: Callable[[], int], what: str) -> None:
            before = measure()
            try:
                async with asyncio.timeout(RECOVERY):
                    while measure() == before and len(received) < STREAM:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise AssertionError(f"{what} did not resume within {RECOVERY} s") from None

        tasks = [asyncio.create_task(produce()), asyncio.create_task(consume())]
        try:
            async with asyncio.timeout(PATIENCE):
                while len(received) < STREAM // 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await disrupt()
            await asyncio.gather(
                progress(lambda: confirmed, "publishing"), progress(lambda: len(received), "consuming")
            )
            async with asyncio.timeout(45):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert received == set(range(STREAM))
        # Both really lost their connection, and aio-pika made them a new one.
        assert sorted(set(reconnected)) == ["consumer", "producer"]


@pytest.mark.slow
async def test_a_stream_survives_the_broker_closing_every_connection(
    make_url: Callable[..., str],
    vhost: str,
) -> None:
    async def close_all_connections() -> None:
        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "--vhost", vhost, "test")

    await stream_through(make_url(), close_all_connections)


@pytest.mark.slow
async def test_a_stream_survives_a_broker_restart(make_url: Callable[..., str]) -> None:
    async def restart() -> None:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(2)  # publishers wait meanwhile, consumers get nothing
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")

    try:
        await stream_through(make_url(), restart)
    finally:
        # Whatever happened, leave the broker running for everyone else.
        await asyncio.to_thread(rabbitmqctl, "start_app")


class Proxy:
    """A TCP proxy to the broker that a test can hold, cut and make refuse connections."""

    def __init__(self) -> None:
        self.attempts = 0  # connections tried, refused ones included
        self.sent_to_broker = 0  # bytes
        self.refusing = False
        self._replies = asyncio.Event()
        self._replies.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def hold_replies(self) -> None:
        """Stop passing what the broker says (confirms among it) to the client."""
        self._replies.clear()

    def pass_replies(self) -> None:
        self._replies.set()

    def cut(self) -> None:
        """Drop every connection, as a failing network would."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.attempts += 1
        if self.refusing:
            client.transport.abort()
            return
        broker_reader, broker = await asyncio.open_connection(*BROKER)
        self._writers |= {client, broker}
        for pipe in (
            self._pipe(client_reader, broker, upward=True),
            self._pipe(broker_reader, client, upward=False),
        ):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upward: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if upward:
                    self.sent_to_broker += len(data)
                else:
                    await self._replies.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def proxied_url(make_url: Callable[..., str]) -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy()
    port = await proxy.start()
    url = make_url(reconnect_interval=0.2).replace(f"{BROKER[0]}:{BROKER[1]}", f"127.0.0.1:{port}")
    try:
        yield proxy, url
    finally:
        await proxy.stop()


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_publish_in_flight_when_the_connection_drops_raises_publish_not_confirmed(
    proxied_url: tuple[Proxy, str],
) -> None:
    proxy, url = proxied_url
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("work")
        proxy.hold_replies()
        sent_before = proxy.sent_to_broker
        publishing = asyncio.create_task(transport.send(envelope(), "work"))
        await wait_for(lambda: proxy.sent_to_broker > sent_before)  # on the wire, unconfirmed
        proxy.cut()
        proxy.pass_replies()
        with pytest.raises(PublishNotConfirmed, match="connection lost"):
            await asyncio.wait_for(publishing, PATIENCE)
        # The transport reconnects by itself; publishing works again.
        await transport.send(envelope(seq="again"), "work")


async def test_a_publish_while_reconnecting_waits_for_the_connection(
    proxied_url: tuple[Proxy, str],
) -> None:
    proxy, url = proxied_url
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("work")
        deliveries = transport.receive("work", prefetch=1)
        proxy.refusing = True
        proxy.cut()
        attempts = proxy.attempts
        await wait_for(lambda: proxy.attempts >= attempts + 1)  # the transport is reconnecting
        publishing = asyncio.create_task(transport.send(envelope(seq="patient"), "work"))
        await wait_for(lambda: proxy.attempts >= attempts + 3)  # two more failed attempts
        assert not publishing.done()  # waiting, not failing
        proxy.refusing = False
        await asyncio.wait_for(publishing, PATIENCE)
        (delivery,) = await take(deliveries)  # and the consumer came back too
        assert delivery.headers["seq"] == "patient"
        await delivery.ack()


async def test_a_temporary_queue_is_declared_bound_and_consumed_again_after_a_reconnection(
    proxied_url: tuple[Proxy, str],
) -> None:
    proxy, url = proxied_url
    async with RabbitMQTransport.from_url(url) as transport:
        # The broker deletes an exclusive queue with its connection; aio-pika must bring back the
        # queue, its bindings and its consumer, in that order.
        await transport.declare_queue("replies-1", temporary=True)
        await transport.bind("replies-1", "Announcement")
        deliveries = transport.receive("replies-1", prefetch=10)
        await transport.send(envelope(seq="before"), "replies-1")
        (before,) = await take(deliveries)
        await before.ack()
        reconnected = asyncio.Event()
        transport.connection().reconnect_callbacks.add(lambda *_: reconnected.set())
        proxy.cut()
        await asyncio.wait_for(reconnected.wait(), PATIENCE)
        await transport.send(envelope(seq="reply"), "replies-1")
        await transport.publish(envelope("Announcement", seq="event"))
        seqs = set()
        for delivery in await take(deliveries, 2):
            seqs.add(delivery.headers["seq"])
            await delivery.ack()
        assert seqs == {"reply", "event"}


async def test_reconnection_attempts_are_spaced_by_the_reconnect_interval(
    proxied_url: tuple[Proxy, str],
) -> None:
    proxy, url = proxied_url  # reconnect_interval=0.2
    async with RabbitMQTransport.from_url(url) as transport:
        await transport.declare_queue("work")
        proxy.refusing = True
        proxy.cut()
        before = proxy.attempts
        await asyncio.sleep(2.0)
        tried = proxy.attempts - before
        proxy.refusing = False
        # One attempt per interval at most (and some slack): a broker that is down is not hammered.
        assert 1 <= tried <= 2.0 / 0.2 + 2
        await transport.send(envelope(seq="back"), "work")  # and it comes back by itself
