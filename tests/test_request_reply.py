"""Request/reply through the bus, on every transport (tidings.requests)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import TRANSPORTS, system_url, unique
from tests.helpers import eventually, running
from tidings import (
    Bus,
    Command,
    Context,
    DecodeError,
    RemoteError,
    Reply,
    RequestTimeout,
    RetryPolicy,
    TransportClosed,
)


class GetQuote(Command, name="request-reply-test.get-quote"):
    product_id: int
    asked_by: str = ""


# Wire names of their own: without expect= a reply class is found by its wire name, and other test
# modules in the same process may well have a `Quote` of their own.
class Quote(Reply, name="request-reply-test.quote"):
    product_id: int
    price: Decimal
    asked_by: str = ""


class Other(Reply, name="request-reply-test.other"):
    note: str


@pytest.fixture(params=TRANSPORTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return system_url(request.param, tmp_path)


@pytest.fixture
def name() -> Callable[[str], str]:
    """Unique service names, so RabbitMQ queues of different tests never meet."""
    suffix = unique("-")
    return lambda service: service + suffix


def quoting(bus: Bus, *, via_context: bool = False) -> None:
    """Make `bus` answer GetQuote with a price derived from the product id."""

    @bus.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Quote | None:
        answer = Quote(
            product_id=request.product_id,
            price=Decimal(request.product_id) / 100,
            asked_by=request.asked_by,
        )
        if via_context:
            await ctx.reply(answer)
            return None
        return answer


async def test_a_request_gets_the_reply_its_handler_returns(url: str, name: Callable[[str], str]) -> None:
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)
    basket.route(GetQuote, to=pricing.service)
    quoting(pricing)

    async with running(pricing), basket:  # the requester never runs a consumer of its own
        answer = await basket.request(GetQuote(product_id=250), expect=Quote, timeout=30)

    assert answer == Quote(product_id=250, price=Decimal("2.5"))
    assert basket.late_replies == 0


async def test_a_handler_may_answer_through_its_context(url: str, name: Callable[[str], str]) -> None:
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)
    quoting(pricing, via_context=True)

    async with running(pricing), basket:
        answer = await basket.request(GetQuote(product_id=7), to=pricing.service, timeout=30)

    # Without expect= the reply's class is found by its wire name.
    assert isinstance(answer, Quote)
    assert answer.price == Decimal("0.07")


async def test_1000_concurrent_requests_from_two_instances_each_get_their_own_answer(
    url: str, name: Callable[[str], str]
) -> None:
    responders = [Bus(name("pricing"), url, concurrency=32) for _ in range(2)]
    requesters = [Bus(name("basket"), url) for _ in range(2)]
    handled_by: Counter[int] = Counter()
    for index, responder in enumerate(responders):

        @responder.handle(GetQuote)
        async def quote(request: GetQuote, ctx: Context, index: int = index) -> Quote:
            handled_by[index] += 1
            await asyncio.sleep(0)  # let the other requests interleave with this one
            return Quote(product_id=request.product_id, price=Decimal(1), asked_by=request.asked_by)

    for requester in requesters:
        requester.route(GetQuote, to=responders[0].service)

    async def ask(requester: Bus, tag: str, product_id: int) -> tuple[str, int, Quote]:
        question = GetQuote(product_id=product_id, asked_by=tag)
        return tag, product_id, await requester.request(question, expect=Quote, timeout=60)

    async with running(*responders), requesters[0], requesters[1]:
        assert requesters[0].reply_queue != requesters[1].reply_queue
        answers = await asyncio.gather(
            *(ask(requesters[n % 2], f"requester-{n % 2}", n) for n in range(1000))
        )

    assert len(answers) == 1000
    for tag, product_id, answer in answers:
        assert (answer.asked_by, answer.product_id) == (tag, product_id)
    assert sum(handled_by.values()) == 1000
    assert [r.late_replies for r in requesters] == [0, 0]


async def test_no_reply_within_the_timeout_raises_and_the_late_reply_is_dropped_and_counted(
    url: str, name: Callable[[str], str]
) -> None:
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)
    basket.route(GetQuote, to=pricing.service)
    slow = asyncio.Event()

    @pricing.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Quote:
        if request.product_id == 1:
            await slow.wait()  # held until the requester has given up
        return Quote(product_id=request.product_id, price=Decimal(request.product_id))

    async with running(pricing), basket:
        with pytest.raises(RequestTimeout, match=r"no reply to request-reply-test\.get-quote"):
            await basket.request(GetQuote(product_id=1), expect=Quote, timeout=0.3)
        # The late answer to 1 is now on its way while 2 waits on the same reply queue.
        slow.set()
        answer = await basket.request(GetQuote(product_id=2), expect=Quote, timeout=30)
        await eventually(lambda: basket.late_replies == 1)

    assert answer.product_id == 2  # never the late answer to request 1


async def test_a_request_nobody_handles_times_out(url: str, name: Callable[[str], str]) -> None:
    pricing = Bus(name("pricing"), url)  # declares its queue, never consumes it
    basket = Bus(name("basket"), url)
    async with pricing, basket:
        with pytest.raises(RequestTimeout):
            await basket.request(GetQuote(product_id=1), to=pricing.service, timeout=0.2)


async def test_a_handler_that_fails_for_good_raises_remote_error_at_the_requester(
    url: str, name: Callable[[str], str]
) -> None:
    pricing = Bus(name("pricing"), url, retry=RetryPolicy(immediate=1, delays=()))
    basket = Bus(name("basket"), url)
    calls: list[int] = []

    @pricing.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Quote:
        calls.append(ctx.attempt)
        raise LookupError(f"no price for product {request.product_id}")

    async with running(pricing), basket:
        # A timeout this long would fail the test by itself: the fault reply must come first.
        with pytest.raises(RemoteError) as raised:
            await basket.request(GetQuote(product_id=9), to=pricing.service, timeout=60)

    assert raised.value.error_type == "builtins.LookupError"
    assert raised.value.message == "no price for product 9"
    assert calls == [1, 2]  # the retry policy ran its course before the requester heard
    assert pricing.stats.dead_lettered == 1
    assert basket.late_replies == 0


async def test_a_reply_of_another_type_than_expected_is_a_decode_error(
    url: str, name: Callable[[str], str]
) -> None:
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)

    @pricing.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Other:
        return Other(note="not a quote")

    async with running(pricing), basket:
        with pytest.raises(DecodeError) as raised:
            await basket.request(GetQuote(product_id=1), to=pricing.service, expect=Quote, timeout=30)
        assert raised.value.reason == "unexpected-reply"
        inferred = await basket.request(GetQuote(product_id=1), to=pricing.service, timeout=30)

    assert inferred == Other(note="not a quote")


async def test_a_reply_to_an_instance_that_left_is_dropped_by_the_responder(
    url: str, name: Callable[[str], str]
) -> None:
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)
    release = asyncio.Event()
    started = asyncio.Event()

    @pricing.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Quote:
        started.set()
        await release.wait()
        return Quote(product_id=request.product_id, price=Decimal(1))

    async with running(pricing):
        async with basket:
            asking = asyncio.create_task(
                basket.request(GetQuote(product_id=1), to=pricing.service, timeout=30)
            )
            await started.wait()
        # The requester closed while its request was being handled.
        with pytest.raises(TransportClosed):
            await asking
        release.set()
        await eventually(lambda: pricing.stats.handled == 1)

    assert pricing.stats.dead_lettered == 0


async def test_a_request_needs_an_open_bus(name: Callable[[str], str]) -> None:
    basket = Bus(name("basket"), f"memory://{unique()}")
    with pytest.raises(TransportClosed, match="is not open"):
        await basket.request(GetQuote(product_id=1), to="pricing", timeout=1)


class Twin(Reply, name="request-reply-test.twin"):
    note: str


async def test_without_expect_a_wire_name_two_reply_classes_share_is_ambiguous(
    name: Callable[[str], str],
) -> None:
    class OtherTwin(Reply, name="request-reply-test.twin"):  # another service's class, same name
        remark: str = ""

    url = f"memory://{unique()}"
    pricing = Bus(name("pricing"), url)
    basket = Bus(name("basket"), url)

    @pricing.handle(GetQuote)
    async def quote(request: GetQuote, ctx: Context) -> Twin:
        return Twin(note="which class am I?")

    async with running(pricing), basket:
        with pytest.raises(DecodeError) as raised:
            await basket.request(GetQuote(product_id=1), to=pricing.service, timeout=30)
        assert raised.value.reason == "ambiguous-reply"
        answer = await basket.request(GetQuote(product_id=1), to=pricing.service, expect=Twin, timeout=30)

    assert answer == Twin(note="which class am I?")
    assert OtherTwin.wire_name == Twin.wire_name
