"""The transport port's contract (`tidings.transports.base`), the same on every transport.

Every test runs on each transport of `transport_url` (see `conftest.py`), through the port only:
transports are made with `transport_from_url`, never imported. What one transport does beyond the
contract (its URL options, its crash recovery, its broker's topology) is tested in
`tests/transports/`.

Every wait is bounded: a message that never comes fails the test after `PATIENCE`, it does not
hang. Time is only ever asserted as a lower bound (a delayed message must not come early), and
"nothing comes" is looked for over a short window: on a loaded machine such a window can miss a
wrong extra delivery, but a transport that keeps the contract always passes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from tidings.envelope import Envelope
from tidings.errors import NoRoute
from tidings.headers import ATTEMPT
from tidings.transports import transport_from_url
from tidings.transports.base import DeadLetter, Delivery, Transport

#: How long a test waits for a message that must come; one that waits this long has failed.
PATIENCE = 20.0
#: How long a test looks for a message that must not come.
QUIET = 0.3
#: Clock granularity allowed when checking that a delayed message did not come early.
EPSILON = 0.01

FAULT = {"tidings-fault-reason": "handler-failed", "tidings-fault-message": "boom", ATTEMPT: "3"}


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Transport]:
    """Another instance of the transport `url` names (as in another process, or after a restart)."""
    async with transport_from_url(url) as transport:
        yield transport


@pytest.fixture
async def transport(transport_url: str) -> AsyncIterator[Transport]:
    async with opened(transport_url) as transport:
        yield transport


def command(body: str = "{}", **headers: str) -> Envelope:
    return Envelope(type="DoIt", source="tests", body=body.encode(), headers=headers)


def event(type_: str = "Happened", body: str = "{}") -> Envelope:
    return Envelope(type=type_, source="tests", body=body.encode())


def receiving(transport: Transport, queue: str, *, prefetch: int) -> AsyncGenerator[Delivery, None]:
    """`transport.receive`, typed as the async generator it is, so that the tests can close it."""
    return cast(AsyncGenerator[Delivery, None], transport.receive(queue, prefetch=prefetch))


async def take(deliveries: AsyncIterator[Delivery], count: int = 1) -> list[Delivery]:
    """The next `count` deliveries, unsettled; fails the test if they do not come."""
    async with asyncio.timeout(PATIENCE):
        return [await anext(deliveries) for _ in range(count)]


async def drain(transport: Transport, queue: str, count: int) -> list[Delivery]:
    """Receive and ack the next `count` messages of `queue` (the iterator is closed afterwards)."""
    deliveries = receiving(transport, queue, prefetch=count)
    try:
        got = await take(deliveries, count)
    finally:
        await deliveries.aclose()
    for delivery in got:
        await delivery.ack()
    return got


async def nothing_within(transport: Transport, queue: str, seconds: float = QUIET) -> bool:
    """Whether `queue` yields nothing for `seconds` (a delivery, if one comes, is released)."""
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


def ids(messages: Iterable[Delivery | Envelope | DeadLetter]) -> list[str]:
    """The message ids, in order."""
    return [_id(message) for message in messages]


def _id(message: Delivery | Envelope | DeadLetter) -> str:
    if isinstance(message, Envelope):
        return message.id
    if isinstance(message, DeadLetter):
        return message.message_id
    return message.headers["id"]


async def dead_lettered(transport: Transport, queue: str, count: int) -> list[Envelope]:
    """`count` commands sent to `queue`, received and dead-lettered with `FAULT`, in order."""
    sent = [command(str(i), x_user=f"user-{i}") for i in range(count)]
    for envelope in sent:
        await transport.send(envelope, queue)
    deliveries = receiving(transport, queue, prefetch=count)
    for delivery in await take(deliveries, count):
        await delivery.dead_letter({**delivery.headers, **FAULT})
    await deliveries.aclose()
    return sent


# -- routing ---------------------------------------------------------------------------------------


async def test_publish_copies_an_event_into_every_queue_bound_to_its_type_only(transport: Transport) -> None:
    for queue in ("billing", "shipping", "audit"):
        await transport.declare_queue(queue)
    await transport.declare_queue("billing")  # declaring is idempotent
    await transport.bind("billing", "Happened")
    await transport.bind("shipping", "Happened")
    await transport.bind("shipping", "Happened")  # binding twice is binding once
    await transport.bind("audit", "Other")
    await transport.publish(event(body="1"))
    await transport.publish(event("Unbound", body="lost"))  # bound nowhere: fine, and lost
    await transport.unbind("shipping", "Happened")
    await transport.unbind("shipping", "Never")  # unbinding what was never bound is fine
    await transport.unbind("no-such-queue", "Happened")
    await transport.publish(event(body="2"))
    await transport.publish(event("Other", body="3"))

    assert bodies(await drain(transport, "billing", 2)) == [b"1", b"2"]
    assert bodies(await drain(transport, "shipping", 1)) == [b"1"]  # one copy, and none of "2"
    assert bodies(await drain(transport, "audit", 1)) == [b"3"]
    for queue in ("billing", "shipping", "audit"):
        assert await nothing_within(transport, queue)


async def test_headers_and_body_arrive_exactly_as_sent(transport: Transport) -> None:
    await transport.declare_queue("mirror")
    sent = Envelope(
        type="ordering.place-order",
        source="basket",
        body='{"note": "ünïcode"}'.encode(),
        datacontenttype="application/vnd.shop+json",
        subject="s",
        correlation_id="corr",
        causation_id="cause",
        headers={
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "x-user": "Zoë 🚀",
            "tidings-reply-to": "basket.replies.1",
        },
    )
    binary = Envelope(
        type="Blob", source="tests", body=bytes(range(256)), datacontenttype="application/octet-stream"
    )
    await transport.send(sent, "mirror")
    await transport.send(binary, "mirror")
    delivery, blob = await drain(transport, "mirror", 2)
    assert delivery.headers == sent.to_headers()
    assert delivery.body == sent.body
    assert delivery.delivery_count == 1
    assert blob.headers == binary.to_headers()
    assert blob.body == bytes(range(256))


async def test_sending_to_or_receiving_from_a_queue_that_does_not_exist_raises_no_route(
    transport: Transport,
) -> None:
    with pytest.raises(NoRoute, match="nowhere"):
        await transport.send(command(), "nowhere")
    later = datetime.now(UTC) + timedelta(seconds=5)
    with pytest.raises(NoRoute, match="nowhere"):
        await transport.send(command(), "nowhere", not_before=later)
    with pytest.raises(NoRoute):
        await anext(receiving(transport, "nowhere", prefetch=1))
    with pytest.raises(NoRoute):
        await transport.dead_letters("nowhere")
    # Once declared, the queue takes what is sent to it.
    await transport.declare_queue("nowhere")
    await transport.send(command("now"), "nowhere")
    assert bodies(await drain(transport, "nowhere", 1)) == [b"now"]


# -- receiving: order, competition, prefetch -------------------------------------------------------


async def test_with_prefetch_one_messages_come_oldest_first(transport: Transport) -> None:
    await transport.declare_queue("orders")
    await transport.bind("orders", "Happened")
    for i in range(30):
        if i % 3:
            await transport.publish(event(body=str(i)))
        else:
            await transport.send(command(str(i)), "orders")
    handled: list[bytes] = []
    deliveries = receiving(transport, "orders", prefetch=1)
    async with asyncio.timeout(PATIENCE):
        async for delivery in deliveries:
            handled.append(delivery.body)
            await delivery.ack()
            if len(handled) == 30:
                break
    await deliveries.aclose()
    assert handled == [str(i).encode() for i in range(30)]


async def test_competing_receivers_get_each_message_exactly_once(transport_url: str) -> None:
    async with opened(transport_url) as one, opened(transport_url) as two:
        await one.declare_queue("work")
        seen: Counter[bytes] = Counter()
        done = asyncio.Event()
        total = 40

        async def compete(transport: Transport) -> None:
            async for delivery in receiving(transport, "work", prefetch=3):
                seen[delivery.body] += 1
                await delivery.ack()
                if seen.total() >= total:
                    done.set()
                await asyncio.sleep(0)  # let the other receivers in

        receivers = [asyncio.create_task(compete(t)) for t in (one, two, two)]
        for i in range(total):
            await (one if i % 2 else two).send(command(str(i)), "work")
        async with asyncio.timeout(PATIENCE):
            await done.wait()
        assert await nothing_within(one, "work")  # and no second copy of any
        for receiver in receivers:
            receiver.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    assert seen == Counter(str(i).encode() for i in range(total))


async def test_a_receiver_is_handed_no_more_than_prefetch_unsettled_deliveries(
    transport: Transport,
) -> None:
    await transport.declare_queue("q")
    for i in range(5):
        await transport.send(command(str(i)), "q")
    deliveries = receiving(transport, "q", prefetch=2)
    first, second = await take(deliveries, 2)
    third = asyncio.ensure_future(anext(deliveries))
    await asyncio.sleep(QUIET)
    assert not third.done()  # two unsettled: the third waits although three more are ready
    await first.ack()
    async with asyncio.timeout(PATIENCE):
        assert (await third).body == b"2"
    await second.ack()
    await (await third).ack()
    await deliveries.aclose()


async def test_what_a_receiver_may_not_hold_under_its_prefetch_goes_to_another(
    transport_url: str,
) -> None:
    async with opened(transport_url) as one, opened(transport_url) as two:
        await one.declare_queue("work")
        sent = [command(str(i)) for i in range(10)]
        for envelope in sent:
            await one.send(envelope, "work")
        first = receiving(one, "work", prefetch=3)
        held = await take(first, 3)
        # The first receiver holds three and may not take (nor buffer) more until it settles, so a
        # second receiver gets every other message.
        second = receiving(two, "work", prefetch=20)
        others = await take(second, 7)
        assert sorted(ids(held) + ids(others)) == sorted(ids(sent))
        for delivery in [*held, *others]:
            await delivery.ack()
        await first.aclose()
        await second.aclose()


async def test_every_kind_of_settlement_makes_room_under_prefetch(transport: Transport) -> None:
    await transport.declare_queue("q")
    for name in ("acked", "dead", "retried", "released"):
        await transport.send(command(name), "q")
    deliveries = receiving(transport, "q", prefetch=1)
    (acked,) = await take(deliveries)
    await acked.ack()
    (dead,) = await take(deliveries)
    await dead.dead_letter({**dead.headers, **FAULT})
    (retried,) = await take(deliveries)
    await retried.retry_later(3600, {**retried.headers, ATTEMPT: "2"})
    (released,) = await take(deliveries)
    await released.release()
    (again,) = await take(deliveries)  # the released one, on the same receiver
    await again.ack()
    await deliveries.aclose()
    assert bodies([acked, dead, retried, released, again]) == [
        b"acked",
        b"dead",
        b"retried",
        b"released",
        b"released",
    ]
    assert again.headers == released.headers
    assert again.delivery_count == 2


# -- settling --------------------------------------------------------------------------------------


async def test_a_released_delivery_is_next_out_at_once_with_its_count_increased(
    transport: Transport,
) -> None:
    await transport.declare_queue("q")
    sent = [command(str(i)) for i in range(3)]
    for envelope in sent:
        await transport.send(envelope, "q")
    deliveries = receiving(transport, "q", prefetch=1)
    (first,) = await take(deliveries)
    await deliveries.aclose()
    assert first.delivery_count == 1
    await first.release()
    again = await drain(transport, "q", 3)
    assert ids(again) == ids(sent)  # still the oldest
    assert [d.delivery_count for d in again] == [2, 1, 1]
    assert again[0].headers == first.headers == sent[0].to_headers()  # unhandled: unchanged
    assert await nothing_within(transport, "q")


async def test_deliveries_unsettled_when_their_transport_closes_come_back_counted(
    transport_url: str,
) -> None:
    async with opened(transport_url) as other:
        await other.declare_queue("q")
        sent = [command(str(i)) for i in range(3)]
        for envelope in sent:
            await other.send(envelope, "q")
        holder = transport_from_url(transport_url)
        await holder.open()
        deliveries = receiving(holder, "q", prefetch=2)
        held = await take(deliveries, 2)
        await deliveries.aclose()  # it yielded both: closing the iterator gives nothing back
        await holder.close()  # as if its process died: nothing was settled
        await holder.close()  # closing is idempotent
        # Back at once, not after a visibility timeout: the default ones are longer than PATIENCE.
        again = await drain(other, "q", 3)
    assert sorted(ids(again)) == sorted(ids(sent))
    counts = {d.headers["id"]: d.delivery_count for d in again}
    assert [counts[i] for i in ids(held)] == [2, 2]
    assert counts[sent[2].id] == 1


async def test_retry_later_brings_the_message_back_after_its_delay_with_the_headers_given(
    transport: Transport,
) -> None:
    await transport.declare_queue("q")
    sent = command("late", x_gone="soon")
    await transport.send(sent, "q")
    await transport.send(command("long"), "q")
    deliveries = receiving(transport, "q", prefetch=5)
    late, long = await take(deliveries, 2)
    await long.retry_later(3600, {**long.headers, ATTEMPT: "2"})
    new_headers = {k: v for k, v in late.headers.items() if k != "x-gone"} | {ATTEMPT: "2"}
    retried_at = time.monotonic()
    await late.retry_later(0.5, new_headers)
    await transport.send(command("fresh"), "q")  # not held up behind the delayed ones

    arrivals: dict[bytes, tuple[Delivery, float]] = {}
    for delivery in await take(deliveries, 2):
        arrivals[delivery.body] = (delivery, time.monotonic())
    assert set(arrivals) == {b"fresh", b"late"}
    again, arrived_at = arrivals[b"late"]
    assert arrived_at - retried_at >= 0.5 - EPSILON  # not visible before its delay ran out
    assert again.headers == new_headers  # the headers given, not the old ones
    assert again.headers["id"] == sent.id
    assert again.delivery_count == 1  # counted as a new delivery
    await arrivals[b"fresh"][0].ack()

    await again.retry_later(0, {**again.headers, ATTEMPT: "3"})  # no delay: back at once
    (third,) = await take(deliveries)
    assert third.body == b"late"
    assert third.headers[ATTEMPT] == "3"
    await third.ack()
    await deliveries.aclose()
    assert await nothing_within(transport, "q")  # "long" waits an hour


# -- not_before ------------------------------------------------------------------------------------


async def test_a_message_sent_with_not_before_is_not_delivered_before_then_durably(
    transport_url: str,
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=0.6)
    async with opened(transport_url) as transport:
        await transport.declare_queue("q")
        # Sent first and due in an hour: the later one must not wait behind it.
        await transport.send(command("far"), "q", not_before=due + timedelta(hours=1))
        await transport.send(command("scheduled"), "q", not_before=due)
        await transport.send(command("now"), "q")
    # A new instance (as after a restart) still holds it back until it is due, then delivers it.
    async with opened(transport_url) as transport:
        arrivals: dict[bytes, datetime] = {}
        deliveries = receiving(transport, "q", prefetch=2)
        for delivery in await take(deliveries, 2):
            arrivals[delivery.body] = datetime.now(UTC)
            await delivery.ack()
        await deliveries.aclose()
        assert set(arrivals) == {b"now", b"scheduled"}
        assert arrivals[b"scheduled"] >= due
        assert await nothing_within(transport, "q")  # "far" is still held back


async def test_an_event_published_with_not_before_reaches_every_bound_queue_when_due(
    transport: Transport,
) -> None:
    for queue in ("basket", "search", "audit"):
        await transport.declare_queue(queue)
    await transport.bind("basket", "PriceChanged")
    await transport.bind("search", "PriceChanged")
    due = datetime.now(UTC) + timedelta(seconds=0.5)
    published = event("PriceChanged")
    await transport.publish(published, not_before=due)
    for queue in ("basket", "search"):
        (delivery,) = await drain(transport, queue, 1)
        assert datetime.now(UTC) >= due
        assert delivery.headers == published.to_headers()
    # audit, bound to nothing, got no copy: the marker sent now is the first thing in it.
    await transport.send(command("marker"), "audit")
    assert bodies(await drain(transport, "audit", 1)) == [b"marker"]


# -- closing a receiver ----------------------------------------------------------------------------


async def test_closing_a_receiver_gives_back_what_it_held_but_never_yielded(transport_url: str) -> None:
    async with opened(transport_url) as transport, opened(transport_url) as other:
        await transport.declare_queue("q")
        sent = [command(str(i)) for i in range(10)]
        for envelope in sent:
            await transport.send(envelope, "q")
        deliveries = receiving(transport, "q", prefetch=10)
        (first,) = await take(deliveries)
        await asyncio.sleep(QUIET)  # room for a transport that prefetches to take the other nine
        await deliveries.aclose()
        await first.ack()  # a yielded delivery is still settled as usual after its iterator closed
        rest = await drain(other, "q", 9)  # given back to the queue, not kept in this instance
        assert ids(rest) == ids(sent[1:])  # nothing lost, still oldest first
        assert await nothing_within(other, "q")  # and the acked one does not come back


# -- dead letters ----------------------------------------------------------------------------------


async def test_a_dead_letter_is_listed_in_its_error_queue_with_the_headers_given(
    transport: Transport,
) -> None:
    await transport.declare_queue("orders")
    await transport.declare_queue("other")
    sent = await dead_lettered(transport, "orders", 3)

    letters = await transport.dead_letters("orders")
    assert ids(letters) == ids(sent)  # oldest first
    for letter, envelope in zip(letters, sent, strict=True):
        assert letter.headers == {**envelope.to_headers(), **FAULT}
        assert letter.body == envelope.body
    assert ids(await transport.dead_letters("orders")) == ids(sent)  # listing removes nothing
    assert ids(await transport.dead_letters("orders", limit=2)) == ids(sent[:2])
    assert await transport.dead_letters("other") == []  # each queue has its own error queue
    assert await nothing_within(transport, "orders")  # moved, not copied


async def test_replay_puts_dead_letters_back_onto_their_queue_with_their_id(transport: Transport) -> None:
    await transport.declare_queue("orders")
    sent = await dead_lettered(transport, "orders", 3)

    assert await transport.replay("orders", [sent[1].id, "not-there"]) == 1
    (replayed,) = await drain(transport, "orders", 1)
    # Same id, body and headers, less the fault and attempt headers; a fresh delivery.
    assert replayed.headers == sent[1].to_headers()
    assert replayed.body == sent[1].body
    assert replayed.delivery_count == 1
    assert ids(await transport.dead_letters("orders")) == ids([sent[0], sent[2]])

    assert await transport.replay("orders") == 2
    assert ids(await drain(transport, "orders", 2)) == ids([sent[0], sent[2]])
    assert await transport.dead_letters("orders") == []
    assert await transport.replay("orders") == 0


async def test_purge_deletes_every_dead_letter_of_the_queue_and_counts_them(transport: Transport) -> None:
    await transport.declare_queue("orders")
    await transport.declare_queue("other")
    await dead_lettered(transport, "orders", 3)
    (kept,) = await dead_lettered(transport, "other", 1)
    waiting = command("waiting")
    await transport.send(waiting, "orders")

    assert await transport.purge_dead_letters("orders") == 3
    assert await transport.dead_letters("orders") == []
    assert await transport.purge_dead_letters("orders") == 0
    assert await transport.replay("orders") == 0
    assert ids(await transport.dead_letters("other")) == [kept.id]  # other queues keep theirs
    assert ids(await drain(transport, "orders", 1)) == [waiting.id]  # the queue itself keeps its own
