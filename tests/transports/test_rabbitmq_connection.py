"""The RabbitMQ transport's URL and its failures to connect: clear, quick, redacted, no retry loop.

Only the credential tests need a broker (see test_rabbitmq.py for how it is found).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from tests.tcp_proxy import TcpProxy
from tests.transports import test_rabbitmq as common
from tests.transports.test_rabbitmq import BROKER, unavailable
from tidings.errors import ConnectionFailed, TransportClosed
from tidings.transports import transport_from_url
from tidings.transports.rabbitmq import RabbitMQTransport
from tidings.transports.rabbitmq.settings import QueueType, RabbitMQSettings, TLSSettings

# The same fixtures as test_rabbitmq: this module's own vhost, URLs of a fresh namespace in it.
vhost = common.vhost
make_url = common.make_url


def test_the_url_options_are_read() -> None:
    settings = RabbitMQSettings.from_url(
        "amqps://app:s3cret@rabbit.example:5671/shop?namespace=eshop&queue_type=classic"
        "&delivery_limit=5&connect_timeout=2.5&publish_timeout=7&reconnect_interval=0.5"
        "&heartbeat=30&cafile=/etc/ca.pem"
    )
    assert settings == RabbitMQSettings(
        broker_url="amqps://app:s3cret@rabbit.example:5671/shop?heartbeat=30",
        tls=TLSSettings(cafile="/etc/ca.pem"),  # the TLS options are tidings' (tls.py)
        namespace="eshop",
        queue_type=QueueType.CLASSIC,
        delivery_limit=5,
        connect_timeout=2.5,
        publish_timeout=7.0,
        reconnect_interval=0.5,
    )
    assert settings.redacted_url == "amqps://app:***@rabbit.example:5671/shop?heartbeat=30"


def test_the_defaults() -> None:
    settings = RabbitMQSettings.from_url("amqp://localhost")
    assert settings.namespace == "tidings"
    assert settings.queue_type is QueueType.QUORUM
    assert settings.delivery_limit == 20
    assert settings.connect_timeout == 10.0


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("amqp://guest:hunter2@localhost:notaport/", "Port"),
        ("amqp://guest:hunter2@:5672/", "no host"),
        ("amqp://guest:hunter2@localhost/?namespace=a%20b", "namespace"),
        ("amqp://guest:hunter2@localhost/?queue_type=stream", "queue_type"),
        ("amqp://guest:hunter2@localhost/?delivery_limit=0", "delivery_limit"),
        ("amqp://guest:hunter2@localhost/?connect_timeout=-1", "connect_timeout"),
        ("amqp://guest:hunter2@localhost/?connect_timeout=soon", "connect_timeout"),
        ("amqp://guest:hunter2@localhost/?namspace=typo", "unknown option 'namspace'"),
    ],
)
def test_a_malformed_url_is_refused_at_once_without_showing_the_password(url: str, complaint: str) -> None:
    with pytest.raises(ConnectionFailed, match=complaint) as caught:
        transport_from_url(url)
    assert "hunter2" not in str(caught.value)
    assert "guest:***@" in str(caught.value)


def client_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What aio-pika and aiormq logged at INFO or above: a failed open() must leave none."""
    # The format strings, not the formatted messages: aio-pika logs objects whose repr breaks
    # once they have run (a spent callback), and caplog formats lazily.
    return [
        f"{record.name}: {record.msg}"
        for record in caplog.records
        if record.name.startswith(("aio_pika", "aiormq")) and record.levelno >= logging.INFO
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aio_pika_tasks() -> list[asyncio.Task[object]]:
    """Tasks running aio-pika or aiormq code: a reconnection loop left behind would be one."""
    current = asyncio.current_task()
    return [
        task
        for task in asyncio.all_tasks()
        if task is not current
        and any(name in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
                for name in ("aio_pika", "aiormq"))
    ]  # fmt: skip


async def test_an_unreachable_broker_fails_quickly_and_clearly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()  # nothing listens there
    transport = transport_from_url(
        f"amqp://guest:hunter2@127.0.0.1:{port}/?namespace=x&reconnect_interval=0.1"
    )
    with pytest.raises(
        ConnectionFailed, match=f"cannot connect to RabbitMQ at amqp://guest:\\*\\*\\*@127.0.0.1:{port}"
    ) as caught:
        await transport.open()
    assert "Connect call failed" in str(caught.value)  # the reason
    assert aio_pika_tasks() == []
    # Said once, by the error: no "error when creating transport", no "Reconnecting after ...",
    # now or after a few reconnect intervals.
    await asyncio.sleep(0.5)
    assert client_records(caplog) == []
    with pytest.raises(TransportClosed):
        await transport.declare_queue("q")


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, Callable[[], int]]]:
    """A TCP server that accepts connections and never says a word: (port, connections so far)."""
    accepted = 0
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, lambda: accepted
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_broker_that_does_not_answer_fails_after_the_connect_timeout(
    silent_server: tuple[int, Callable[[], int]],
) -> None:
    port, connections = silent_server
    transport = transport_from_url(
        f"amqp://guest:hunter2@127.0.0.1:{port}/?connect_timeout=0.5&reconnect_interval=0.2"
    )
    with pytest.raises(ConnectionFailed, match=r"no answer from RabbitMQ at .* within 0\.5 s") as caught:
        await transport.open()
    assert "hunter2" not in str(caught.value)
    assert aio_pika_tasks() == []
    # No reconnection loop behind the failure: several reconnect intervals later, still one attempt.
    await asyncio.sleep(1.0)
    assert connections() == 1


async def test_wrong_credentials_fail_clearly(
    make_url: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = make_url(reconnect_interval=0.1).replace("guest:guest@", "guest:wrong-password@")
    transport = RabbitMQTransport.from_url(url)
    with pytest.raises(ConnectionFailed, match="refused the credentials") as caught:
        await transport.open()
    assert "ACCESS_REFUSED" in str(caught.value)  # the broker's reason
    assert "wrong-password" not in str(caught.value)
    assert aio_pika_tasks() == []
    await asyncio.sleep(0.5)
    assert client_records(caplog) == []


async def test_a_vhost_that_does_not_exist_fails_clearly(caplog: pytest.LogCaptureFixture) -> None:
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError:
        unavailable(f"RabbitMQ does not answer on {BROKER[0]}:{BROKER[1]}")
    caplog.set_level(logging.INFO)
    transport = transport_from_url(f"amqp://guest:guest@{BROKER[0]}:{BROKER[1]}/no-such-vhost")
    with pytest.raises(ConnectionFailed) as caught:
        await transport.open()
    message = str(caught.value)
    assert "refused vhost 'no-such-vhost': it does not exist, or user 'guest' has no permission" in message
    assert "Expected one of" not in message  # the client's frame talk, which named no vhost
    assert aio_pika_tasks() == []
    assert client_records(caplog) == []


async def test_open_and_close_are_idempotent(make_url: Callable[..., str]) -> None:
    transport = RabbitMQTransport.from_url(make_url())
    await transport.close()  # never opened: nothing to do
    await transport.open()
    await transport.open()
    await transport.declare_queue("q")
    await transport.close()
    await transport.close()
    with pytest.raises(TransportClosed):
        await transport.declare_queue("q")


async def test_a_connection_lost_after_it_was_made_is_logged_once_by_tidings_the_client_at_debug(
    make_url: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    # A later loss is an outage: tidings' one WARNING says it; the client's records of each
    # reconnection attempt are kept, at DEBUG (tests/transports/test_rabbitmq_outage_logs.py).
    caplog.set_level(logging.DEBUG)
    async with TcpProxy(BROKER) as proxy:  # noqa: SIM117 (the transport's URL needs the proxy)
        async with RabbitMQTransport.from_url(proxy.rewrite(make_url(reconnect_interval=0.1))) as transport:
            await transport.declare_queue("q")
            proxy.cut()
            async with asyncio.timeout(20):
                while not any("Reconnecting" in str(r.msg) for r in caplog.records):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await transport.declare_queue("q")  # reconnected: nothing is left half-way at close
    client = [r for r in caplog.records if r.name.startswith(("aio_pika", "aiormq"))]
    assert any("Reconnecting" in str(r.msg) for r in client)
    assert {r.levelname for r in client} == {"DEBUG"}
    (started,) = [r for r in caplog.records if r.__dict__.get("outage") == "started"]
    assert started.levelno == logging.WARNING
    assert started.name == "tidings.transports.rabbitmq"
