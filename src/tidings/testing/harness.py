"""`Harness`: runs one service's bus in a test, on real parts, and shows what it did.

    async with Harness(bus) as h:
        await h.send(CheckoutBasket(buyer="alice"))     # as if from another service
        await h.idle()                                  # every message in flight settled
        assert h.sent(PlaceOrder)[0].buyer == "alice"   # what the bus sent on
        assert h.handled(CheckoutBasket) and not h.dead_lettered

For the harness's lifetime the bus runs (`bus.run()` in a task) on a transport of the harness's
own, `RecordingTransport` (tidings.testing.recording) around a private memory broker
(`memory://harness-<id>`, its clock `h.clock`) or around a real transport (`real="amqp://..."`).
Everything else is the bus's own: its pipeline, retry policy, error queue, request/reply, and with
`database=` its inbox, outbox and relay against the engine the test gave it. When the harness
closes, the bus is stopped, closed and given its own transport back.

Messages the test sends come from a second, handler-less bus named `source` ("harness") on the same
broker: to the bus they come from another service, and its replies go back over real reply queues.
docs/testing.md shows the whole of it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import Literal, Self, TypedDict, TypeVar, Unpack, overload

from tidings.bus import Bus
from tidings.dead_letters import FailedMessage
from tidings.envelope import Envelope
from tidings.errors import ConfigurationError
from tidings.messages import Command, Event, Message, Reply
from tidings.requests import RequestOptions
from tidings.sending import PublishOptions, SendOptions
from tidings.testing.clock import Clock
from tidings.testing.recording import Delivered, Outgoing, RecordingTransport, Traffic
from tidings.transports import DeadLetter, Transport, transport_from_url
from tidings.transports.memory import MemoryBroker, MemoryTransport

__all__ = ["DEFAULT_TIMEOUT", "Harness", "HarnessOptions", "RetryDelays"]

M = TypeVar("M", bound=Message)
E = TypeVar("E", bound=Event)
R = TypeVar("R", bound=Reply)

#: Seconds `idle()` and `request()` wait before they fail, unless told otherwise.
DEFAULT_TIMEOUT = 10.0

#: What becomes of the delays the bus asks of its transport (delayed retries, `Retry(delay=)`, the
#: backoff after `Unavailable`): "keep" them, "skip" them (0 s), or multiply them by a factor.
RetryDelays = Literal["keep", "skip"] | float


class HarnessOptions(TypedDict, total=False):
    """The keyword options of `Harness` besides `real` (what the pytest fixture passes on)."""

    retry_delays: RetryDelays
    create_tables: bool
    source: str
    timeout: float


# While busy, idle() looks again at each change of the traffic, and at least this often (the outbox
# table changes without any traffic: a commit, the relay marking rows sent).
_POLL = 0.02
# A quiet moment counts once it held across this pause too: a second look, for safety's sake.
_CONFIRM = 0.005


class _RealTime(Clock):
    """The clock of a harness on a real transport: the broker keeps its own time, which a test
    cannot move; `Harness.advance` waits instead."""

    def advance(self, by: float | timedelta) -> None:
        raise ConfigurationError(
            "a real transport keeps real time: use `await h.advance(...)`, which waits that long"
        )


class Harness:
    """Runs `bus` for a test and records what it does; see the module docstring.

    - `real`: a transport URL to run on instead of a private memory broker. It should name an
      empty system (a fresh SQLite file, a RabbitMQ namespace of its own); the pytest plugin's
      `--tidings-transport` makes one per test.
    - `retry_delays`: "keep" (default: a delayed retry waits for the clock, `advance()`), "skip"
      (retried at once), or a factor (0.01: a hundred times sooner); skipped or compressed
      retries are waited for by `idle()`.
    - `create_tables`: with `database=`, create the outbox and inbox tables first if missing.
    - `source`: the service name the test's own messages come from.
    - `timeout`: seconds `idle()` and `request()` wait by default.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        real: str | None = None,
        retry_delays: RetryDelays = "keep",
        create_tables: bool = True,
        source: str = "harness",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if source == bus.service:
            raise ConfigurationError(f"the harness's source must not be the bus's own service {source!r}")
        if not timeout > 0:
            raise ConfigurationError("the harness's timeout must be above 0 seconds")
        self.bus = bus
        self.real = real
        self.source = source
        self.timeout = timeout
        self.create_tables = create_tables
        #: The time of the memory broker: `advance()` moves it. On a real transport, real time.
        self.clock: Clock = Clock() if real is None else _RealTime()
        self._traffic = Traffic(
            self.clock.now, delay_factor=_delay_factor(retry_delays), wait_for_retries=retry_delays != "keep"
        )
        self._client: Bus | None = None
        self._original: Transport | None = None
        self._running: asyncio.Task[None] | None = None
        self._unlisten: list[Callable[[], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Put the bus on the harness's transport, start it and run it in the background."""
        if self._client is not None:
            raise ConfigurationError("this harness is started already")
        bus_side, client_side = self._transports()
        self._original = self.bus._use_transport(bus_side)
        client = Bus(self.source, client_side, max_body_size=self.bus.max_body_size)
        self._client = client
        try:
            traffic = self._traffic
            traffic.watched = self.bus.queue
            traffic.consumed = {self.bus.queue, self.bus.reply_queue, client.reply_queue}
            if self.bus.database is not None and self.create_tables:
                await self.bus.create_tables()
            await client.start()
            await self.bus.start()
            self._running = asyncio.create_task(self.bus.run(), name=f"harness:{self.bus.service}")
        except BaseException:
            await self.close()
            raise

    def _transports(self) -> tuple[RecordingTransport, RecordingTransport]:
        inner: Transport
        client: Transport
        if self.real is None:
            url = f"memory://harness-{uuid.uuid4().hex[:12]}"
            # A broker of its own, not registered under its URL: nothing outlives the harness.
            broker = MemoryBroker()
            inner = MemoryTransport(broker, url=url, clock=self.clock.now)
            client = MemoryTransport(broker, url=url, clock=self.clock.now)
            self._unlisten.append(self.clock.on_advance(broker.wake))
        else:
            inner, client = transport_from_url(self.real), transport_from_url(self.real)
        return (
            RecordingTransport(inner, self._traffic, record=True),
            RecordingTransport(client, self._traffic, record=False),
        )

    async def close(self) -> None:
        """Stop and close the bus (in-flight handlers finish first), give it its transport back.

        Raises what `bus.run()` failed with, if it did.
        """
        failure: BaseException | None = None
        running, self._running = self._running, None
        if running is not None:
            self.bus.stop()
            (result,) = await asyncio.gather(running, return_exceptions=True)
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                failure = result
        client, self._client = self._client, None
        try:
            await self.bus.close()
        finally:
            if client is not None:
                await client.close()
            if self._original is not None:
                self.bus._use_transport(self._original)
                self._original = None
            for unlisten in self._unlisten:
                unlisten()
            self._unlisten.clear()
        if failure is not None:
            raise failure

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close()
        except Exception:
            if exc is None:
                raise
            # The test's own failure says more than what followed from it.

    # -- what the test does --------------------------------------------------------------------

    async def send(self, command: Command, **options: Unpack[SendOptions]) -> None:
        """Send `command` from `source` (to the bus's service unless `to=` says otherwise)."""
        options.setdefault("to", self.bus.service)
        await self._the_client().send(command, **options)

    async def publish(self, event: Event, **options: Unpack[PublishOptions]) -> None:
        """Publish `event` from `source`: the bus gets it if it subscribed to it."""
        await self._the_client().publish(event, **options)

    @overload
    async def request(self, command: Command, *, expect: type[R], **options: Unpack[RequestOptions]) -> R: ...
    @overload
    async def request(
        self, command: Command, *, expect: None = None, **options: Unpack[RequestOptions]
    ) -> Reply: ...
    async def request(
        self, command: Command, *, expect: type[Reply] | None = None, **options: Unpack[RequestOptions]
    ) -> Reply:
        """Ask the bus's service and return its reply, as `Bus.request` does (`RemoteError` when the
        handler failed for good, `RequestTimeout` after `timeout`, by default the harness's)."""
        options.setdefault("to", self.bus.service)
        options.setdefault("timeout", self.timeout)
        return await self._the_client().request(command, expect=expect, **options)

    async def deliver(self, envelope: Envelope) -> None:
        """Put `envelope` into the bus's queue as it is, its id included (a duplicate, say)."""
        await self._the_client().transport.send(envelope, self.bus.queue)

    # A deadline of its own, not asyncio.timeout around it: its error says what was still in flight.
    async def idle(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once nothing is in flight: no message due in the bus's or a reply queue, no
        delivery unsettled, no publish or send under way, no outbox row of the bus unshipped.

        Messages held back for later are not in flight until they come due: scheduled messages
        (`delay=`, `at=`), and delayed retries while `retry_delays` is "keep"; `advance()` brings
        them (`scheduled` counts them). Retries whose delays are skipped or compressed are waited
        for. `TimeoutError`, saying what was still in flight, after `timeout` seconds (by default
        the harness's).
        """
        limit = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        quiet = 0
        while True:
            self._check_running()
            reasons = self._traffic.busy() or await self._unshipped()
            if not reasons:
                quiet += 1
                if quiet == 2:
                    return
                await asyncio.sleep(_CONFIRM)
                continue
            quiet = 0
            if loop.time() >= deadline:
                raise TimeoutError(f"{self.bus.service} was not idle within {limit} s: {'; '.join(reasons)}")
            await self._traffic.changed(_POLL)

    async def advance(self, by: float | timedelta) -> None:
        """Let `by` pass, then wait until idle: on the memory broker the clock jumps at once (what
        has come due is handled); on a real transport, by waiting that long."""
        if self.real is None:
            self.clock.advance(by)
        else:
            await asyncio.sleep(by.total_seconds() if isinstance(by, timedelta) else by)
        await self.idle()

    # -- what the bus did ----------------------------------------------------------------------

    @property
    def outgoing(self) -> list[Outgoing]:
        """Every message the bus published or sent (its handlers, its outbox, its replies), oldest
        first, as the transport took it."""
        return list(self._traffic.outgoing)

    @property
    def deliveries(self) -> list[Delivered]:
        """Every delivery from the bus's queue and how it was settled, in the order settled."""
        return list(self._traffic.delivered)

    def sent(self, message_type: type[M]) -> list[M]:
        """The commands (or replies) of this type the bus sent, oldest first; to services that do
        not run in the test too."""
        return [
            o.message(message_type)
            for o in self._traffic.outgoing
            if not o.published and o.is_a(message_type)
        ]

    def published(self, message_type: type[E]) -> list[E]:
        """The events of this type the bus published, oldest first."""
        return [
            o.message(message_type) for o in self._traffic.outgoing if o.published and o.is_a(message_type)
        ]

    def handled(self, message_type: type[M]) -> list[M]:
        """The messages of this type the bus acknowledged: handled, or found handled before by its
        inbox (`bus.stats.duplicates` counts those), in the order settled."""
        return [
            d.message(message_type)
            for d in self._traffic.delivered
            if d.outcome == "acked" and d.is_a(message_type)
        ]

    @property
    def dead_lettered(self) -> list[FailedMessage]:
        """The messages the bus moved to its error queue, each with its fault (reason, exception,
        attempts), in the order dead-lettered."""
        return [
            FailedMessage.from_dead_letter(DeadLetter(d.message_id, d.settled_headers, d.body))
            for d in self._traffic.delivered
            if d.outcome == "dead-lettered"
        ]

    @property
    def scheduled(self) -> int:
        """Messages held back for later on their way to the bus (delayed retries, scheduled ones)."""
        return self._traffic.scheduled()

    # -- inside --------------------------------------------------------------------------------

    def _the_client(self) -> Bus:
        if self._client is None:
            raise ConfigurationError("the harness is not started: `async with Harness(bus) as h:`")
        return self._client

    def _check_running(self) -> None:
        running = self._running
        if running is None:
            raise ConfigurationError("the harness is not started: `async with Harness(bus) as h:`")
        if running.done():
            error = None if running.cancelled() else running.exception()
            raise RuntimeError(f"the bus {self.bus.service!r} stopped running under the harness") from error

    async def _unshipped(self) -> list[str]:
        """The bus's committed outbox rows not shipped yet, in words (empty without a database)."""
        engine = self.bus.database
        if engine is None:
            return []
        from sqlalchemy import func, select

        from tidings.storage import outbox_table

        columns = outbox_table.c
        query = (
            select(func.count())
            .select_from(outbox_table)
            .where(columns.service == self.bus.service, columns.sent_at.is_(None))
        )
        async with engine.connect() as connection:
            count = int(await connection.scalar(query) or 0)
        return [f"{count} outbox row(s) not shipped yet"] if count else []


def _delay_factor(retry_delays: RetryDelays) -> float:
    if retry_delays == "keep":
        return 1.0
    if retry_delays == "skip":
        return 0.0
    if isinstance(retry_delays, int | float) and not isinstance(retry_delays, bool) and retry_delays >= 0:
        return float(retry_delays)
    raise ConfigurationError(
        f'retry_delays takes "keep", "skip" or a factor of 0 or more, not {retry_delays!r}'
    )
