"""Several hosts in one URL (issue 16): parsed, shown without the password, and failed over.

The failover test puts two TCP proxies to the test broker behind a dead port, in one URL: the
transport connects to the first that answers, and after that node "dies" (the proxy refuses and
cuts) it publishes and consumes through the next. The real cluster, with a node killed under a
stream of messages, is tests/cluster/test_node_loss.py.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import RABBITMQ_HOST
from tests.tcp_proxy import TcpProxy
from tests.transports.test_rabbitmq import envelope
from tidings.errors import ConnectionFailed, PublishNotConfirmed
from tidings.transports.rabbitmq import RabbitMQSettings, RabbitMQTransport


def test_a_list_of_hosts_is_one_url_per_node() -> None:
    settings = RabbitMQSettings.from_url("amqp://app:s3cret@h1:5701,h2:5702,h3/shop?namespace=eshop")
    assert settings.hosts == ("h1:5701", "h2:5702", "h3")
    assert settings.broker_urls == (
        "amqp://app:s3cret@h1:5701/shop",
        "amqp://app:s3cret@h2:5702/shop",
        "amqp://app:s3cret@h3/shop",
    )
    assert settings.vhost == "shop"
    assert settings.namespace == "eshop"
    assert settings.redacted_url == "amqp://app:***@h1:5701,h2:5702,h3/shop"
    assert "s3cret" not in repr(settings)
    one = RabbitMQSettings.from_url("amqp://app:s3cret@h1:5701/shop")
    assert (one.hosts, one.broker_urls) == ((), ("amqp://app:s3cret@h1:5701/shop",))


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("amqp://app:pw@h1:5701,,h3/", "empty host"),
        ("amqp://app:pw@h1:5701,h2:x/", "host 'h2:x'"),
        ("amqp://app:pw@h1:5701,h2:0/", "port 0"),
    ],
)
def test_a_bad_host_in_the_list_is_refused_at_once(url: str, complaint: str) -> None:
    with pytest.raises(ConnectionFailed, match=complaint) as refused:
        RabbitMQSettings.from_url(url)
    assert ":pw@" not in str(refused.value)


def _dead_port() -> int:
    with socket.socket() as probe:  # bound, then closed: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_first_node_that_answers_is_used_and_the_next_after_losing_it(rabbitmq_url: str) -> None:
    host, port = RABBITMQ_HOST
    async with TcpProxy(RABBITMQ_HOST) as first, TcpProxy(RABBITMQ_HOST) as second:
        nodes = f"127.0.0.1:{_dead_port()},127.0.0.1:{first.port},127.0.0.1:{second.port}"
        url = rabbitmq_url.replace(f"{host}:{port}", nodes, 1) + "&reconnect_interval=0.2"
        async with RabbitMQTransport.from_url(url) as transport:
            assert (first.live, second.live) == (1, 0)  # the dead port was skipped
            await transport.declare_queue("failover")
            received = transport.receive("failover", prefetch=10)
            await transport.send(envelope(seq="1"), "failover")
            delivery = await asyncio.wait_for(anext(received), 20)
            await delivery.ack()

            first.refusing = True  # the node dies: its connection goes, and it takes no new one
            first.cut()
            async with asyncio.timeout(20):
                while True:  # the port's contract: a publish the loss cut short goes again
                    try:
                        await transport.send(envelope(seq="2"), "failover")
                        break
                    except PublishNotConfirmed:
                        await asyncio.sleep(0.1)
            async with asyncio.timeout(20):
                while (delivery := await anext(received)).headers["seq"] != "2":
                    await delivery.ack()  # "1" again: its ack may have gone with the connection
            await delivery.ack()
            assert (first.live, second.live) == (0, 1)
            await received.aclose()
