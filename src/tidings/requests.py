"""Request/reply: a command goes out, a `Reply` comes back as a message of its own.

    answer = await bus.request(GetQuote(product_id=1), expect=Quote, timeout=5.0)

Each `Bus` object owns a temporary reply queue, `{service}.replies.{instance}`, declared and
consumed from `Bus.start()` to `Bus.close()`, not only inside `run()`: a client that never runs a
consumer still gets its replies, and with several instances of one service each reply reaches the
instance that asked. A request carries `tidings-reply-to` (that queue); the responder's reply
carries `tidings-request-id` (the request's message id). Waiting requests are futures keyed by that
id, so a reply can only complete the request it answers. A reply nobody waits for any more (it came
after the timeout, or it is a second answer to a redelivered request) is acknowledged, dropped and
counted in `late_replies`.

When the handler of a request fails for good, the responder dead-letters the request as usual and
then sends a *fault reply* (wire type `tidings.fault`, the failure in `tidings-fault-*` headers), so
the requester raises `RemoteError` at once instead of waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict, Unpack

from pydantic import ValidationError

from tidings.consumer import consume
from tidings.envelope import DEFAULT_MAX_BODY_SIZE, Envelope, decode_body
from tidings.errors import (
    ConfigurationError,
    DecodeError,
    InvalidMessageType,
    RemoteError,
    RequestTimeout,
    TidingsError,
    TransportClosed,
)
from tidings.headers import FAULT_PREFIX, REPLY_TO, REQUEST_ID
from tidings.logs import logger
from tidings.messages import Command, Reply
from tidings.sending import Sender
from tidings.telemetry import traced
from tidings.transports.base import Delivery, Transport

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "FAULT_REPLY_TYPE", "RequestOptions", "Requests"]

log = logger("tidings.requests")

#: How long `Bus.request` waits for a reply when no `timeout=` is given, in seconds.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: The wire type of the reply a responder sends when the request's handler failed for good.
FAULT_REPLY_TYPE = "tidings.fault"

# Settling a reply is only an ack, but on a durable transport each ack is a round trip to the broker
# or the disk: settle many at once so that the reply queue keeps up with many waiting requests.
_REPLY_CONCURRENCY = 64
_REPLY_PREFETCH = 256
# What the fault reply carries over from the dead letter's fault headers. Not the traceback: the
# requester gets the failure's type and message; the details stay in the responder's error queue.
_FAULT_FIELDS = ("reason", "type", "message", "attempts", "service")
# After the reply queue's consumer failed (the connection dropped), wait this long before resuming.
_RECONSUME_DELAY = 1.0
_RECANCEL_INTERVAL = 0.1


class RequestOptions(TypedDict, total=False):
    """The keyword options of `Bus.request`, besides `expect`."""

    #: Seconds to wait for the reply, sending included (default `DEFAULT_REQUEST_TIMEOUT`).
    timeout: float
    #: The service to ask; default: the command's route (`Bus.route`) or this service.
    to: str | None
    headers: Mapping[str, str] | None
    correlation_id: str | None
    causation_id: str | None


@dataclass(frozen=True, slots=True)
class _Received:
    headers: Mapping[str, str]
    body: bytes


class Requests:
    """One bus instance's side of request/reply: its reply queue and the requests waiting on it."""

    def __init__(
        self, sender: Sender, transport: Transport, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE
    ) -> None:
        self._sender = sender
        self._transport = transport
        self._service = sender.service
        self._telemetry = sender.telemetry
        self._max_body_size = max_body_size
        #: This instance's temporary queue; replies to its requests, and only those, arrive here.
        self.reply_queue = f"{sender.service}.replies.{uuid.uuid4().hex[:12]}"
        #: Replies that found no waiting request (too late, or a duplicate) and were dropped.
        self.late_replies = 0
        self._pending: dict[str, asyncio.Future[_Received]] = {}
        self._consumer: asyncio.Task[None] | None = None

    # -- lifecycle (called by Bus.start / Bus.close) -------------------------------------------

    async def open(self) -> None:
        """Declare this instance's reply queue and start consuming it."""
        if self._consumer is not None:
            return
        await self._transport.declare_queue(self.reply_queue, temporary=True)
        self._consumer = asyncio.create_task(self._consume(), name=f"replies:{self.reply_queue}")

    async def close(self) -> None:
        """Stop consuming replies; requests still waiting fail with `TransportClosed`."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.cancel()
            while not consumer.done():
                # Python 3.11's `asyncio.wait_for` swallows a cancellation that lands just as the
                # awaited thing completes; a transport waiting that way keeps going. Ask again.
                await asyncio.wait({consumer}, timeout=_RECANCEL_INTERVAL)
                consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(TransportClosed(f"bus {self._service!r} closed before the reply"))

    async def _consume(self) -> None:
        while True:
            try:
                await consume(
                    self._transport,
                    self.reply_queue,
                    self._on_reply,
                    concurrency=_REPLY_CONCURRENCY,
                    prefetch=_REPLY_PREFETCH,
                    # A reply kills no process: nothing to isolate, and replies must not wait.
                    isolate_redeliveries=False,
                )
            except Exception:
                # Without this consumer every request of this instance would time out: keep at it.
                log.exception("consuming reply queue %s failed; resuming", self.reply_queue)
                await asyncio.sleep(_RECONSUME_DELAY)

    async def _on_reply(self, delivery: Delivery, queue: str) -> None:
        span = self._telemetry.processing(
            self._transport, self._service, delivery.headers, delivery.body, queue
        )
        request_id = delivery.headers.get(REQUEST_ID)
        waiter = self._pending.pop(request_id, None) if request_id is not None else None
        if waiter is None or waiter.done():
            self.late_replies += 1
            self._telemetry.late_reply(self._service, queue)
            log.info("dropping a reply to request %s: nobody waits for it any more", request_id)
        else:
            waiter.set_result(_Received(delivery.headers, delivery.body))
        try:
            await traced(span.settle("ack") if span is not None else None, delivery.ack())
        except Exception:
            # The waiting request has its answer; an unacknowledged reply at worst comes back once
            # more and is then dropped as late.
            log.exception("could not acknowledge a reply on %s", queue)
        finally:
            if span is not None:
                span.end()

    # -- the requester's side ----------------------------------------------------------------

    async def request(
        self, command: Command, *, expect: type[Reply] | None, **options: Unpack[RequestOptions]
    ) -> Reply:
        """Send `command` and wait for its reply; see `Bus.request`."""
        if not isinstance(command, Command):
            raise InvalidMessageType(f"request() takes a Command, not {type(command).__name__}")
        if expect is not None and not (isinstance(expect, type) and issubclass(expect, Reply)):
            raise InvalidMessageType(f"expect= takes a Reply class, not {expect!r}")
        timeout = options.get("timeout", DEFAULT_REQUEST_TIMEOUT)
        if not timeout > 0:
            raise ConfigurationError("a request needs a timeout above 0 seconds")
        if self._consumer is None:
            raise TransportClosed(
                f"bus {self._service!r} is not open: `async with bus:` or `await bus.start()` first"
            )
        queue = options.get("to") or self._sender.routes.of(type(command))
        envelope = self._sender.envelope_for(
            command,
            headers={**(options.get("headers") or {}), REPLY_TO: self.reply_queue},
            correlation_id=options.get("correlation_id"),
            causation_id=options.get("causation_id"),
        )
        # The send and the wait, the reply's arrival (its processing here) and reading it.
        asking = self._telemetry.requesting(self._transport, envelope, queue)
        if asking is None:
            return await self._ask(envelope, queue, timeout, expect)
        try:
            reply = await self._ask(envelope, queue, timeout, expect)
        except BaseException as error:
            asking.end(error)
            raise
        asking.end()
        return reply

    async def _ask(self, envelope: Envelope, queue: str, seconds: float, expect: type[Reply] | None) -> Reply:
        # Registered before the send: the reply may arrive before `dispatch` returns.
        waiter: asyncio.Future[_Received] = asyncio.get_running_loop().create_future()
        self._pending[envelope.id] = waiter
        try:
            async with asyncio.timeout(seconds) as scope:
                await self._sender.dispatch(envelope, queue=queue)
                received = await waiter
        except TimeoutError:
            if not scope.expired():
                raise  # a TimeoutError of the transport's own, not ours
            raise RequestTimeout(
                f"no reply to {envelope.type} {envelope.id} from {queue!r} within {seconds} s"
            ) from None
        finally:
            self._pending.pop(envelope.id, None)
        return self._read(received, expect)

    def _read(self, received: _Received, expect: type[Reply] | None) -> Reply:
        envelope = Envelope.from_headers(received.headers, received.body)
        if envelope.type == FAULT_REPLY_TYPE:
            fault = envelope.headers
            reason = fault.get(FAULT_PREFIX + "reason", "failed")
            raise RemoteError(
                fault.get(FAULT_PREFIX + "type") or reason, fault.get(FAULT_PREFIX + "message", "")
            )
        reply_type = expect if expect is not None and expect is not Reply else _reply_type_named(envelope)
        if reply_type.wire_name != envelope.type:
            raise DecodeError(
                "unexpected-reply",
                f"expected a {reply_type.wire_name!r} reply, got {envelope.type!r}",
                headers=received.headers,
                body=received.body,
            )
        try:
            return reply_type.model_validate(decode_body(envelope, max_size=self._max_body_size))
        except ValidationError as error:
            raise DecodeError(
                "invalid-payload", str(error), headers=received.headers, body=received.body
            ) from None

    # -- the responder's side ----------------------------------------------------------------

    async def on_dead_letter(self, envelope: Envelope, fault: Mapping[str, str]) -> None:
        """A request handled here failed for good: tell its requester now, not at its timeout."""
        reply_queue = envelope.headers.get(REPLY_TO)
        if reply_queue is None:
            return
        fields = {FAULT_PREFIX + name for name in _FAULT_FIELDS}
        fault_reply = Envelope(
            type=FAULT_REPLY_TYPE,
            source=self._service,
            body=b"{}",
            correlation_id=envelope.correlation_id or envelope.id,
            causation_id=envelope.id,
            headers={REQUEST_ID: envelope.id, **{k: v for k, v in fault.items() if k in fields}},
        )
        try:
            await self._sender.dispatch(fault_reply, queue=reply_queue)
        except TidingsError as error:
            # The request is safe in the error queue already; the requester will time out instead.
            log.warning("could not send the fault reply for %s to %s: %s", envelope.id, reply_queue, error)


def _reply_type_named(envelope: Envelope) -> type[Reply]:
    """The one `Reply` class in this process with the envelope's wire name (when no `expect=`)."""
    found = {cls for cls in _subclasses(Reply) if getattr(cls, "wire_name", None) == envelope.type}
    if len(found) == 1:
        return found.pop()
    problem = "no Reply class" if not found else f"{len(found)} Reply classes"
    raise DecodeError(
        "unknown-type" if not found else "ambiguous-reply",
        f"{problem} named {envelope.type!r} in this process: pass expect= to request()",
        headers=envelope.to_headers(),
        body=envelope.body,
    )


def _subclasses(cls: type[Reply]) -> list[type[Reply]]:
    out: list[type[Reply]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out
