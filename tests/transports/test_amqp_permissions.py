"""Each service with a broker user of its own, granted what `tidings topology --permissions` says.

On the private TLS node's plain listener (`tls_broker`), in a namespace of the test's own: the CLI
prints the `set_permissions` commands of two services, the test runs them for two fresh users,
and then service A (billing) publishes events and sends commands to B (shipping), which gets
them (with the full sizes also a delayed one, so that A declares the delay cascade); while A's
attempts to consume B's queue, bind to it, or declare a queue outside its names each raise
`AccessRefused`, once: the node's log shows one refusal per attempt and none in the seconds
after it (no retry loop).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from tests.sizes import FULL
from tests.transports.tls_broker import TLSBroker
from tidings import Bus, Command, Context, Event
from tidings.errors import AccessRefused
from tidings.transports.rabbitmq import RabbitMQTransport

SERVICES = """
from tidings import Bus, Command, Event


class InvoiceIssued(Event, name="perm.invoice-issued"):
    number: int


class Ship(Command, name="perm.ship"):
    number: int


billing = Bus("billing")
billing.route(Ship, to="shipping")
shipping = Bus("shipping")
"""


class InvoiceIssued(Event, name="perm.invoice-issued"):
    number: int


class Ship(Command, name="perm.ship"):
    number: int


def granted_commands(tmp_path: Path, url: str) -> list[list[str]]:
    """What `tidings topology --permissions` prints for both services, as argument lists."""
    (tmp_path / "perm_services.py").write_text(SERVICES)
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "topology", "--permissions", "perm_services:billing",
         "perm_services:shipping", "--transport", url],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("rabbitmqctl")]
    assert [command[4] for command in commands] == ["billing", "shipping"], done.stdout
    return commands


def refusals(broker: TLSBroker, user: str) -> int:
    """How many refusals of `user`'s operations the node has logged so far."""
    text = broker.log.read_text(errors="replace") if broker.log.exists() else ""
    return text.count(f"refused for user '{user}'")


async def test_each_service_gets_what_it_needs_and_is_refused_the_rest(
    tls_broker: TLSBroker, tmp_path: Path
) -> None:
    vhost = ""  # the default vhost of the private node, "/": the namespace keeps tests apart
    namespace = f"p{uuid.uuid4().hex[:6]}"
    options = {"namespace": namespace, "reconnect_interval": "1"}
    commands = granted_commands(tmp_path, tls_broker.plain_url("guest", "guest", vhost, **options))
    passwords = {}
    for command in commands:
        user = command[4]
        passwords[user] = f"pw-{uuid.uuid4().hex}"
        tls_broker.broker.ctl("add_user", user, passwords[user])
        tls_broker.broker.ctl(*command[1:])  # set_permissions -p <vhost> <user> <c> <w> <r>
    try:
        url = {user: tls_broker.plain_url(user, passwords[user], vhost, **options) for user in passwords}
        shipping = Bus("shipping", url["shipping"])
        got: list[object] = []

        @shipping.subscribe(InvoiceIssued)
        async def on_invoice(event: InvoiceIssued, ctx: Context) -> None:
            got.append(event)

        @shipping.handle(Ship)
        async def on_ship(command: Ship, ctx: Context) -> None:
            got.append(command)

        billing = Bus("billing", url["billing"])
        billing.route(Ship, to="shipping")
        async with shipping, billing:
            consuming = asyncio.create_task(shipping.run())
            try:
                await billing.publish(InvoiceIssued(number=1))
                await billing.send(Ship(number=1))
                if FULL:  # declares the 32 quorum queues of the delay cascade: seconds
                    await billing.send(Ship(number=2), delay=timedelta(seconds=0.2))
                expected = ["InvoiceIssued", "Ship", "Ship"] if FULL else ["InvoiceIssued", "Ship"]
                async with asyncio.timeout(30):
                    while len(got) < len(expected):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                assert sorted(type(m).__name__ for m in got) == expected

                transport = billing.transport
                assert isinstance(transport, RabbitMQTransport)
                before = refusals(tls_broker, "billing")
                with pytest.raises(AccessRefused, match="access to queue"):
                    await anext(aiter(transport.receive("shipping", prefetch=1)))
                with pytest.raises(AccessRefused, match="access to queue"):
                    await transport.bind("shipping", "perm.invoice-issued")
                with pytest.raises(AccessRefused, match="access to queue"):
                    await transport.declare_queue("elsewhere")
                # Still of use afterwards, and nothing tried again behind the caller's back.
                await billing.publish(InvoiceIssued(number=2))
                await asyncio.sleep(2)  # two reconnect intervals
                assert refusals(tls_broker, "billing") - before == 3
                async with asyncio.timeout(20):
                    while len(got) < len(expected) + 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                shipping.stop()
                await asyncio.gather(consuming, return_exceptions=True)
    finally:
        for user in passwords:
            tls_broker.broker.ctl("delete_user", user)
