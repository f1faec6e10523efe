"""TLS to the broker (issue 16): `amqps://` with the test CA, a client certificate, hostname checks.

Against a private node whose TLS listener requires a client certificate from the test CA
(`tls_broker`). Each way of getting it wrong is a `ConnectionFailed` from `open()` that says what
is wrong; `require_tls` refuses a plain URL before any network I/O.
"""

from __future__ import annotations

import socket

import pytest

from tests.transports.tls_broker import TLSBroker
from tidings.errors import ConnectionFailed
from tidings.transports.rabbitmq import RabbitMQTransport
from tidings.transports.rabbitmq.settings import RabbitMQSettings, TLSSettings


async def open_and_close(url: str, **options: object) -> None:
    transport = RabbitMQTransport.from_url(url, **options)  # type: ignore[arg-type]
    await transport.open()
    try:
        await transport.declare_queue("tls-check")
    finally:
        await transport.close()


async def refusal(url: str, **options: object) -> str:
    with pytest.raises(ConnectionFailed) as raised:
        await open_and_close(url, **options)
    message = str(raised.value)
    assert "guest:guest" not in message
    return message


def client_options(broker: TLSBroker, cert: str = "client") -> dict[str, str]:
    return {"certfile": broker.file(f"{cert}.pem"), "keyfile": broker.file(f"{cert}.key")}


async def test_the_right_ca_and_a_client_certificate_connect(tls_broker: TLSBroker) -> None:
    await open_and_close(tls_broker.url(cafile=tls_broker.file("ca.pem"), **client_options(tls_broker)))


async def test_the_settings_object_says_the_same_as_the_url_options(tls_broker: TLSBroker) -> None:
    tls = TLSSettings(cafile=tls_broker.file("ca.pem"), certfile=tls_broker.file("client.pem"),
                      keyfile=tls_broker.file("client.key"))  # fmt: skip
    await open_and_close(tls_broker.url(), tls=tls, require_tls=True)


async def test_a_wrong_ca_fails_saying_the_certificate_is_not_trusted(tls_broker: TLSBroker) -> None:
    message = await refusal(
        tls_broker.url(cafile=tls_broker.file("other-ca.pem"), **client_options(tls_broker))
    )
    assert "certificate is not trusted" in message, message


async def test_a_hostname_mismatch_fails_and_check_hostname_false_allows_it(tls_broker: TLSBroker) -> None:
    # The broker's certificate names localhost, not 127.0.0.1.
    url = tls_broker.url("127.0.0.1", cafile=tls_broker.file("ca.pem"), **client_options(tls_broker))
    message = await refusal(url)
    assert "does not name this host" in message, message
    await open_and_close(url + "&check_hostname=false")


async def test_an_expired_client_certificate_is_refused(tls_broker: TLSBroker) -> None:
    message = await refusal(
        tls_broker.url(cafile=tls_broker.file("ca.pem"), **client_options(tls_broker, "expired"))
    )
    assert "expired" in message.lower(), message


async def test_no_client_certificate_where_the_broker_requires_one_is_refused(tls_broker: TLSBroker) -> None:
    message = await refusal(tls_broker.url(cafile=tls_broker.file("ca.pem")))
    assert "requires a client certificate" in message, message


async def test_an_unreadable_ca_file_fails_before_connecting(tls_broker: TLSBroker) -> None:
    message = await refusal(tls_broker.url(cafile="/nonexistent/ca.pem"))
    assert "cafile=/nonexistent/ca.pem" in message, message


def test_require_tls_refuses_a_plain_url_before_any_network_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network I/O attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ConnectionFailed, match="TLS is required") as raised:
        RabbitMQTransport.from_url("amqp://app:s3cret@rabbit:5672/shop", require_tls=True)
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ConnectionFailed, match="TLS is required"):
        RabbitMQSettings(broker_url="amqp://app:s3cret@rabbit:5672/", require_tls=True)
    assert RabbitMQTransport.from_url(
        "amqps://app:s3cret@rabbit:5671/shop", require_tls=True
    ).settings.uses_tls


def test_tls_options_on_a_plain_url_are_refused() -> None:
    with pytest.raises(ConnectionFailed, match="need an amqps:// URL"):
        RabbitMQSettings.from_url("amqp://guest:guest@localhost/?cafile=/etc/ca.pem")
