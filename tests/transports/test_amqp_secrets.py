"""Secrets stay secret (issue 16): no broker or database password in any log line, exception
message or dead-letter header, under DEBUG logging, through failures, refusals and reconnects.

On the private TLS node's plain listener (`tls_broker`) and the local PostgreSQL: every record of
every logger at DEBUG (formatted, with its traceback), every exception the test meets (str and
repr, with their causes), and the headers of what ends in the error queue are captured, then
searched for each password.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import POSTGRES_HOST, require_server
from tests.tcp_proxy import TcpProxy
from tests.transports.tls_broker import TLSBroker
from tidings import Bus, Context, Event
from tidings.errors import AccessRefused, TidingsError
from tidings.retry import RetryPolicy
from tidings.transports.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.postgres


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # the traceback too, when there is one


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def described(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error) + str(error)


class Leak(Event, name="secrets.leak"):
    n: int


async def test_no_password_in_logs_errors_or_dead_letters(tls_broker: TLSBroker, captured: Captured) -> None:
    require_server("PostgreSQL", POSTGRES_HOST)
    broker_password, wrong_password, db_password = (
        f"{kind}-{uuid.uuid4().hex}" for kind in ("bpw", "wpw", "dpw")
    )
    user, vhost = f"secret-{uuid.uuid4().hex[:6]}", ""  # the node's own "/"
    ctl = tls_broker.broker.ctl
    ctl("add_user", user, broker_password)
    # Everything in its namespace, nothing else: a declaration elsewhere is refused.
    ns = f"s{uuid.uuid4().hex[:6]}"
    ctl("set_permissions", "-p", "/", user, f"^{ns}\\.", f"^{ns}\\.", f"^{ns}\\.")
    seen: list[str] = []
    try:
        # A connection failure: the wrong password, then nothing listening.
        for url in (tls_broker.plain_url(user, wrong_password, vhost, namespace=ns),
                    f"amqp://{user}:{wrong_password}@127.0.0.1:1/{vhost}"):  # fmt: skip
            with pytest.raises(TidingsError) as failed:
                await RabbitMQTransport.from_url(url).open()
            seen.append(described(failed.value))

        # A database that cannot be reached, with a password in its URL (the handler's failure
        # is its fault headers' text), and the right broker password, through a proxy to cut.
        database = create_async_engine(f"postgresql+asyncpg://postgres:{db_password}@127.0.0.1:1/test")
        async with TcpProxy(("127.0.0.1", tls_broker.broker.port)) as proxy:
            url = proxy.rewrite(tls_broker.plain_url(user, broker_password, vhost, namespace=ns))
            bus = Bus("keeper", url, retry=RetryPolicy(immediate=0, delays=()))

            @bus.subscribe(Leak)
            async def handle(event: Leak, ctx: Context) -> None:
                async with database.connect() as connection:  # fails: nothing on port 1
                    await connection.execute(text("SELECT 1"))

            async with bus:
                running = asyncio.create_task(bus.run())
                await bus.publish(Leak(n=1))
                async with asyncio.timeout(20):
                    while bus.stats.dead_lettered < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                proxy.cut()  # a reconnect, logged at DEBUG by aio-pika and aiormq
                async with asyncio.timeout(20):
                    while True:
                        try:
                            await bus.publish(Leak(n=2))
                            break
                        except TidingsError as error:
                            seen.append(described(error))
                            await asyncio.sleep(0.2)
                # Not waited for: the second message's dead letter. Once in three full runs under
                # load the consumer was not consuming again 20 s after the cut (the publisher
                # was); that is the reconnection tests' business, this test's is what is logged.
                # A permission refusal: another namespace's exchanges.
                elsewhere = RabbitMQTransport.from_url(url.replace(f"namespace={ns}", "namespace=z"))
                with pytest.raises(AccessRefused) as refused:
                    await elsewhere.open()
                seen.append(described(refused.value))
                letters = await bus.transport.dead_letters(bus.queue)
                assert len(letters) >= 1
                seen += [f"{letter.headers}" for letter in letters]
                assert any("Connect call failed" in letter.headers.get("tidings-fault-message", "")
                           or "127.0.0.1" in str(letter.headers) for letter in letters)  # fmt: skip
                bus.stop()
                await running
        await database.dispose()
    finally:
        ctl("delete_user", user)
    everything = "\n".join([*captured.lines, *seen])
    # Proof that there was plenty to look through: DEBUG lines of the AMQP client and tidings.
    assert any(line.startswith("aiormq") for line in captured.lines)
    assert any(line.startswith("tidings") for line in captured.lines)
    for secret in (broker_password, wrong_password, db_password):
        assert secret not in everything, [line for line in everything.splitlines() if secret in line][:5]
