"""The SQLite transport beyond the port's contract (that is tests/conformance/test_transport.py):
URL options, the schema, shared commits, wakeups and claims, durability and redelivery across real
OS processes killed with SIGKILL, temporary queues."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest

from tidings.envelope import Envelope
from tidings.errors import ConfigurationError, ConnectionFailed, NoRoute, TransportClosed
from tidings.transports import transport_from_url
from tidings.transports.base import Delivery
from tidings.transports.sqlite import SQLiteSettings, SQLiteTransport, connection_thread

#: Every wait in these tests is bounded: a message that never comes fails the test, not hangs it.
PATIENCE = 10.0


def event(body: str = "{}", type_: str = "Happened") -> Envelope:
    return Envelope(type=type_, source="tests", body=body.encode())


def command(body: str = "{}") -> Envelope:
    return Envelope(type="DoIt", source="tests", body=body.encode())


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bus.db'}"


def receiving(transport: SQLiteTransport, queue: str, *, prefetch: int) -> AsyncGenerator[Delivery, None]:
    """`transport.receive`, typed as what it is, so that the tests can close it."""
    return cast(AsyncGenerator[Delivery, None], transport.receive(queue, prefetch=prefetch))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[SQLiteTransport]:
    transport = SQLiteTransport.from_url(url)
    async with transport:
        yield transport


async def take(transport: SQLiteTransport, queue: str, count: int, prefetch: int = 10) -> list[Delivery]:
    """The next `count` deliveries of `queue`, unsettled; the iterator is closed afterwards."""
    got: list[Delivery] = []
    deliveries = receiving(transport, queue, prefetch=max(prefetch, count))
    try:
        async with asyncio.timeout(PATIENCE):
            async for delivery in deliveries:
                got.append(delivery)
                if len(got) == count:
                    break
    finally:
        await deliveries.aclose()
    return got


async def drain(transport: SQLiteTransport, queue: str, count: int) -> list[Delivery]:
    """Receive and ack `count` messages of `queue`."""
    got = await take(transport, queue, count, prefetch=count)
    for delivery in got:
        await delivery.ack()
    return got


async def nothing_within(transport: SQLiteTransport, queue: str, seconds: float) -> bool:
    """Whether `queue` yields nothing for `seconds` (the delivery, if any, is released)."""
    deliveries = receiving(transport, queue, prefetch=1)
    try:
        async with asyncio.timeout(seconds):
            delivery = await anext(deliveries)
    except TimeoutError:
        return True
    finally:
        await deliveries.aclose()
    await delivery.release()
    return False


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [delivery.body for delivery in deliveries]


# -- configuration ---------------------------------------------------------------------------------


def test_urls_name_relative_and_absolute_paths_and_options() -> None:
    relative = SQLiteSettings.from_url("sqlite:///shop.db")
    assert relative.path == "shop.db"
    assert relative.visibility_timeout == 30.0
    absolute = SQLiteSettings.from_url(
        "sqlite:////var/bus.db?visibility_timeout=2.5&synchronous=full&busy_timeout=1"
    )
    assert absolute.path == "/var/bus.db"
    assert absolute.visibility_timeout == 2.5
    assert absolute.synchronous == "FULL"
    assert absolute.busy_timeout == 1.0
    assert isinstance(transport_from_url("sqlite:///x.db"), SQLiteTransport)


@pytest.mark.parametrize(
    "bad",
    [
        "sqlite:///x.db?visibilty_timeout=2",  # a typo is refused, not ignored
        "sqlite:///x.db?visibility_timeout=soon",
        "sqlite:///x.db?visibility_timeout=0",
        "sqlite:///x.db?synchronous=off",
        "sqlite://host/x.db",
        "sqlite:///",
    ],
)
def test_unusable_urls_are_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteSettings.from_url(bad)


async def test_a_file_that_cannot_be_opened_raises_connection_failed(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="no-such-dir"):
        await SQLiteTransport.from_url(f"sqlite:///{tmp_path}/no-such-dir/bus.db").open()
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_bytes(b"these are not the pages you are looking for" * 100)
    with pytest.raises(ConnectionFailed):
        await SQLiteTransport.from_url(f"sqlite:///{not_a_database}").open()


async def test_the_schema_is_created_with_a_version_and_a_newer_one_is_refused(
    url: str, tmp_path: Path
) -> None:
    async with opened(url):
        pass
    with sqlite3.connect(tmp_path / "bus.db") as db:
        assert db.execute("SELECT version FROM tidings_schema").fetchall() == [(1,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE tidings_schema SET version = 99")
    db.close()
    with pytest.raises(ConnectionFailed, match="99"):
        await SQLiteTransport.from_url(url).open()


async def test_use_before_open_and_after_close_raises_transport_closed(url: str) -> None:
    transport = SQLiteTransport.from_url(url)
    with pytest.raises(TransportClosed):
        await transport.declare_queue("q")
    await transport.open()
    await transport.declare_queue("q")
    await transport.close()
    await transport.close()  # idempotent
    with pytest.raises(TransportClosed):
        await transport.send(command(), "q")
    with pytest.raises(TransportClosed):
        await anext(receiving(transport, "q", prefetch=1))


# -- shared commits --------------------------------------------------------------------------------


async def test_a_refused_request_does_not_spoil_the_others_committed_with_it(url: str) -> None:
    # (NoRoute for send, receive and dead_letters is the port's: tests/conformance/test_transport.py.)
    async with opened(url) as transport:
        with pytest.raises(NoRoute):
            await transport.bind("nowhere", "Happened")
        await transport.declare_queue("somewhere")
        results = await asyncio.gather(
            transport.send(command("a"), "somewhere"),
            transport.send(command("b"), "nowhere"),
            transport.send(command("c"), "somewhere"),
            return_exceptions=True,
        )
        assert [type(result) for result in results] == [type(None), NoRoute, type(None)]
        assert bodies(await drain(transport, "somewhere", 2)) == [b"a", b"c"]


async def test_an_acked_message_is_gone_for_good(url: str) -> None:
    # ack() does not wait for its commit, but shares the next one: close() is a later request on
    # the same thread, so the ack is committed by the time close() returns.
    url += "?visibility_timeout=0.5"
    async with opened(url) as transport:
        await transport.declare_queue("q")
        await transport.send(command("done"), "q")
        await transport.send(command("not done"), "q")
        done, _ = await take(transport, "q", 2)
        await done.ack()
    async with opened(url) as transport:
        (again,) = await drain(transport, "q", 1)
        assert again.body == b"not done"
        # A lost ack would show here: the claim of the closed instance runs out and nothing renews it.
        assert await nothing_within(transport, "q", 1.0)


# -- order -----------------------------------------------------------------------------------------


async def test_concurrent_publishes_are_received_in_the_order_of_the_calls(url: str) -> None:
    async with opened(url) as transport:
        await transport.declare_queue("orders")
        await transport.bind("orders", "Happened")
        # Concurrent publishes share commits; their order is the order of the calls.
        await asyncio.gather(*(transport.publish(event(str(i))) for i in range(50)))
        handled: list[bytes] = []
        deliveries = receiving(transport, "orders", prefetch=1)
        async with asyncio.timeout(PATIENCE):
            async for delivery in deliveries:
                handled.append(delivery.body)
                await delivery.ack()
                if len(handled) == 50:
                    break
        await deliveries.aclose()
    assert handled == [str(i).encode() for i in range(50)]


# -- in-process and cross-process wakeups -----------------------------------------------------------


async def test_a_commit_wakes_a_local_receiver_without_polling(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the look at other processes' commits an hour away, only the in-process wakeup can
    # deliver the message in time.
    monkeypatch.setattr(connection_thread, "_MIN_POLL_INTERVAL", 3600.0)
    url += "?max_poll_interval=3600"
    async with opened(url) as receiving_side, opened(url) as sending:
        await receiving_side.declare_queue("q")
        deliveries = receiving(receiving_side, "q", prefetch=1)
        waiting = asyncio.ensure_future(anext(deliveries))
        await asyncio.sleep(0.2)  # the receiver found the queue empty and sleeps
        assert not waiting.done()
        await sending.send(command("wake up"), "q")
        async with asyncio.timeout(PATIENCE):
            delivery = await waiting
        await delivery.ack()
        await deliveries.aclose()


# -- other processes -------------------------------------------------------------------------------

_PUBLISHER = """
import asyncio, sys
from tidings.envelope import Envelope
from tidings.transports.sqlite import SQLiteTransport

async def main(url):
    async with SQLiteTransport.from_url(url) as transport:
        while True:
            batch = [Envelope(type="Happened", source="child", body=b"{}") for _ in range(20)]
            await asyncio.gather(*(transport.publish(envelope) for envelope in batch))
            print("\\n".join(envelope.id for envelope in batch), flush=True)

asyncio.run(main(sys.argv[1]))
"""

_CLAIMER = """
import asyncio, sys
from tidings.transports.sqlite import SQLiteTransport

async def main(url, queue, temporary):
    async with SQLiteTransport.from_url(url) as transport:
        if temporary:
            await transport.declare_queue(temporary, temporary=True)
        async for delivery in transport.receive(queue, prefetch=1):
            print("claimed", delivery.headers["id"], flush=True)
            await asyncio.sleep(3600)  # a handler that is about to be killed

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""

_SENDER = """
import asyncio, sys
from tidings.envelope import Envelope
from tidings.transports.sqlite import SQLiteTransport

async def main(url):
    async with SQLiteTransport.from_url(url) as transport:
        await transport.send(Envelope(type="DoIt", source="child", body=b"hi"), "q")

asyncio.run(main(sys.argv[1]))
"""


@asynccontextmanager
async def child(tmp_path: Path, script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python process running `script`; killed with SIGKILL (if still alive) on the way out."""
    path = tmp_path / f"child_{abs(hash(script))}.py"
    path.write_text(textwrap.dedent(script))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(path), *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.communicate()


async def line_from(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(PATIENCE):
        line = await process.stdout.readline()
    assert line, "the child process ended early"
    return line.decode().strip()


async def test_a_receiver_in_another_process_sees_a_commit_by_polling(url: str, tmp_path: Path) -> None:
    async with opened(url) as transport:
        await transport.declare_queue("q")
        deliveries = receiving(transport, "q", prefetch=1)
        waiting = asyncio.ensure_future(anext(deliveries))
        async with child(tmp_path, _SENDER, url) as process:
            assert await process.wait() == 0
        async with asyncio.timeout(PATIENCE):
            delivery = await waiting
        assert delivery.body == b"hi"
        await delivery.ack()
        await deliveries.aclose()


async def test_every_confirmed_publish_survives_kill_9_of_the_publisher(url: str, tmp_path: Path) -> None:
    async with opened(url) as transport:
        await transport.declare_queue("q")
        await transport.bind("q", "Happened")
    confirmed: list[str] = []
    async with child(tmp_path, _PUBLISHER, url) as process:
        while len(confirmed) < 500:
            confirmed.append(await line_from(process))
        process.send_signal(signal.SIGKILL)  # mid-stream: it is publishing the next batches
        await process.wait()
    with sqlite3.connect(tmp_path / "bus.db") as db:
        stored = {row[0] for row in db.execute("SELECT message_id FROM tidings_messages")}
    db.close()
    assert set(confirmed) <= stored


async def test_a_message_claimed_by_a_killed_process_comes_back_after_the_timeout(
    url: str, tmp_path: Path
) -> None:
    url += "?visibility_timeout=1"
    async with opened(url) as transport:
        await transport.declare_queue("q")
        sent = command("orphan")
        await transport.send(sent, "q")
        async with child(tmp_path, _CLAIMER, url, "q", "") as process:
            assert await line_from(process) == f"claimed {sent.id}"
            process.send_signal(signal.SIGKILL)
            await process.wait()
        (delivery,) = await drain(transport, "q", 1)
    assert delivery.headers["id"] == sent.id
    assert delivery.delivery_count == 2


async def test_a_live_receiver_keeps_its_claim_past_the_timeout(url: str) -> None:
    url += "?visibility_timeout=1"
    async with opened(url) as holder, opened(url) as rival:
        await holder.declare_queue("q")
        await holder.send(command("slow"), "q")
        (delivery,) = await take(holder, "q", 1, prefetch=1)
        # Two and a half visibility timeouts later, the claim has been renewed, not lost.
        assert await nothing_within(rival, "q", 2.5)
        await delivery.ack()
        assert await nothing_within(rival, "q", 1.2)


# -- what closing gives back -----------------------------------------------------------------------


async def test_an_ack_after_close_is_a_no_op_the_message_being_back_already(url: str) -> None:
    async with opened(url) as other:
        transport = SQLiteTransport.from_url(url)  # visibility timeout 30 s: far beyond PATIENCE
        await transport.open()
        await transport.declare_queue("q")
        await transport.send(command("held"), "q")
        (held,) = await take(transport, "q", 1, prefetch=1)
        await transport.close()
        await held.ack()  # too late: a no-op, the message is already back on its queue
        (again,) = await drain(other, "q", 1)
    assert again.body == b"held"
    assert again.delivery_count == 2


async def test_what_a_closed_receive_iterator_gives_back_is_not_counted_as_delivered(url: str) -> None:
    # That it is given back at all is the port's: tests/conformance/test_transport.py.
    async with opened(url) as transport, opened(url) as other:
        await transport.declare_queue("q")
        await asyncio.gather(*(transport.send(command(str(i)), "q") for i in range(10)))
        deliveries = receiving(transport, "q", prefetch=10)
        first = await anext(deliveries)  # the claim took all ten
        await deliveries.aclose()
        rest = await drain(other, "q", 9)
        await first.ack()
    assert {d.delivery_count for d in rest} == {1}  # never handed out, so not counted


async def test_a_receiver_waiting_when_the_transport_closes_raises_transport_closed(
    url: str,
) -> None:
    transport = SQLiteTransport.from_url(url)
    await transport.open()
    await transport.declare_queue("q")
    waiting = asyncio.ensure_future(anext(receiving(transport, "q", prefetch=1)))
    await asyncio.sleep(0.1)
    await transport.close()
    with pytest.raises(TransportClosed):
        async with asyncio.timeout(PATIENCE):
            await waiting


async def test_a_temporary_queue_is_deleted_with_its_messages_on_close(url: str, tmp_path: Path) -> None:
    async with opened(url) as transport:
        await transport.declare_queue("replies", temporary=True)
        await transport.declare_queue("q")
        await transport.send(command(), "replies")
        await transport.send(command(), "q")
    async with opened(url) as transport:
        with pytest.raises(NoRoute):
            await transport.send(command(), "replies")
        await transport.send(command(), "q")  # durable queues stay
    with sqlite3.connect(tmp_path / "bus.db") as db:
        queues = {row[0] for row in db.execute("SELECT queue FROM tidings_messages")}
    db.close()
    assert queues == {"q"}


async def test_the_temporary_queue_of_a_killed_process_is_deleted_after_its_lease(
    url: str, tmp_path: Path
) -> None:
    url += "?visibility_timeout=0.5"
    async with opened(url) as transport:
        await transport.declare_queue("q")
        await transport.send(command(), "q")
        async with child(tmp_path, _CLAIMER, url, "q", "replies-of-child") as process:
            await line_from(process)  # the temporary queue exists by now
            await transport.send(command(), "replies-of-child")
            process.send_signal(signal.SIGKILL)
            await process.wait()
    await asyncio.sleep(0.6)  # the child's lease runs out
    async with opened(url) as transport:
        with pytest.raises(NoRoute):
            await transport.send(command(), "replies-of-child")
