"""The consume path: decode -> check -> handle (through the middleware chain) -> settle.

Each delivery ends settled exactly once:
- undecodable, unknown type, invalid payload, delivered too often: the error queue with a reason
  code, no handler call, no retry;
- handled: ack (a returned `Reply` is sent back to the requester first);
- the handler raised: immediate retries in process, then delayed retries through the transport,
  then the error queue with the fault attached (`tidings.faults`);
- `Retry` / `Reject` from the handler: later without counting a failure / straight to the error queue;
- `Unavailable` or a `TransportError` (a dependency is down): back to the queue for later, not
  counted as a failure of the handler.

All of it happens within the sender's `telemetry.processing` (the CONSUMER span, current while the
handler runs), which hears of failed attempts, retries and dead letters and times each settle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tidings.backoff import capped_exponential
from tidings.context import Context
from tidings.envelope import DEFAULT_MAX_BODY_SIZE, Envelope, decode_body
from tidings.errors import DecodeError, Reject, Retry, TransportError, Unavailable
from tidings.faults import fault_headers, first_failure_time
from tidings.handlers import Handlers, Middleware, Next, Registration
from tidings.headers import ATTEMPT, FAULT_PREFIX
from tidings.logs import Outage, about, logger
from tidings.messages import Message
from tidings.retry import RetryPolicy
from tidings.sending import Sender
from tidings.stats import Stats
from tidings.telemetry import Processing, traced
from tidings.transports.base import Delivery

__all__ = ["DeadLetterHook", "Pipeline"]

log = logger("tidings.pipeline")

#: How long a message waits before it is tried again when a dependency was unavailable: the first
#: wait of an outage, doubled for each further unavailable attempt in a row, up to the longest.
UNAVAILABLE_DELAY = 1.0
MAX_UNAVAILABLE_DELAY = 30.0

#: Told of each message dead-lettered after it was decoded (request/reply sends a fault reply).
DeadLetterHook = Callable[[Envelope, Mapping[str, str]], Awaitable[None]]


class Pipeline:
    """Runs one delivery through the consume path and settles it."""

    def __init__(
        self,
        *,
        handlers: Handlers,
        sender: Sender,
        stats: Stats,
        retry: RetryPolicy,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_deliveries: int = 10,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.service = sender.service
        # Read at each message, not copied: a handler or middleware added later applies from then on.
        self.handlers = handlers
        self.sender = sender
        self.stats = stats
        self.telemetry = sender.telemetry
        self.retry = retry
        self.max_body_size = max_body_size
        self.max_deliveries = max_deliveries
        self.on_dead_letter = on_dead_letter
        # Unavailable attempts in a row (across messages): an outage, waited out with backoff.
        self._outage_streak = 0
        self._outage = Outage(log, f"a dependency of {self.service}'s handlers")

    async def process(self, delivery: Delivery, queue: str) -> None:
        """Handle and settle one delivery. Never raises: a failure to settle is logged."""
        # Opened before the envelope is read: a message too broken to decode is processed too.
        span = self.telemetry.processing(
            self.sender.transport, self.service, delivery.headers, delivery.body, queue
        )
        try:
            with about(delivery.headers, self.service):  # log records say which message
                await self._process(delivery, queue, span)
        except Exception:
            # The delivery may be unsettled now; the transport brings it back (visibility
            # timeout, connection loss). Losing the consumer loop would be worse.
            log.exception("could not settle a message from %s", queue)
        finally:
            if span is not None:
                span.end()

    async def _process(self, delivery: Delivery, queue: str, span: Processing | None) -> None:
        round_number = _round_of(delivery.headers)
        try:
            envelope = Envelope.from_headers(delivery.headers, delivery.body)
        except DecodeError as error:
            await self._dead_letter(delivery, queue, error.reason, detail=error.detail, span=span)
            return
        if delivery.delivery_count > self.max_deliveries:
            detail = f"delivered {delivery.delivery_count} times without being settled"
            await self._dead_letter(
                delivery, queue, "delivery-limit", detail=detail, envelope=envelope, span=span
            )
            return
        registration = self.handlers.by_type.get(envelope.type)
        if registration is None:
            detail = f"service {self.service!r} has no handler for {envelope.type!r}"
            await self._dead_letter(
                delivery, queue, "unknown-type", detail=detail, envelope=envelope, span=span
            )
            return
        try:
            message = registration.message_type.model_validate(
                decode_body(envelope, max_size=self.max_body_size)
            )
        except DecodeError as error:
            await self._dead_letter(
                delivery, queue, error.reason, detail=error.detail, envelope=envelope, span=span
            )
            return
        except Exception as error:
            # Validators may raise more than ValidationError (TypeError, RecursionError, ...). A
            # payload the model cannot be built from is bad input whatever the exception: retrying
            # cannot help, and letting it escape would leave the delivery unsettled.
            await self._dead_letter(
                delivery, queue, "invalid-payload", error=error, envelope=envelope, span=span
            )
            return
        await self._handle(delivery, queue, envelope, message, registration, round_number, span)

    async def _handle(
        self,
        delivery: Delivery,
        queue: str,
        envelope: Envelope,
        message: Message,
        registration: Registration,
        round_number: int,
        span: Processing | None = None,
    ) -> None:
        policy = registration.retry or self.retry
        calls_per_round = policy.immediate + 1
        # Noted at the first failure of this round: immediate retries of a slow handler can take a
        # while, and the error queue should say when the trouble started, not when it ended.
        first_failure = delivery.headers.get(FAULT_PREFIX + "first-time")
        for immediate in range(calls_per_round):
            attempt = (round_number - 1) * calls_per_round + immediate + 1
            ctx = Context(envelope, attempt, queue, self.sender)
            try:
                result = await self._call(ctx, message, registration)
                if result is not None:
                    # Inside the try: a reply that cannot be sent is a failed attempt, retried like
                    # one, instead of an exception that would leave the delivery unsettled.
                    await ctx.reply(result)
            except Retry as intent:
                self.stats.retries_scheduled += 1
                if span is not None:
                    span.retrying("retry-requested", intent.delay)
                await _settled(span, "retry", delivery.retry_later(intent.delay, delivery.headers))
                return
            except Reject as intent:
                await self._dead_letter(
                    delivery,
                    queue,
                    "rejected",
                    error=intent,
                    attempts=attempt,
                    envelope=envelope,
                    first_failure=first_failure,
                    span=span,
                )
                return
            except (Unavailable, TransportError) as error:
                # Not the handler's fault: back for later, the attempt not counted.
                wait = self._outage_delay(error, queue)
                if span is not None:
                    span.retrying("unavailable", wait, error)
                await _settled(span, "retry", delivery.retry_later(wait, delivery.headers))
                return
            except Exception as error:
                self.stats.failed_attempts += 1
                if span is not None:
                    span.attempt_failed(error, attempt)
                first_failure = first_failure or first_failure_time(delivery.headers)
                log.warning(
                    "handler for %s failed on %s (attempt %d): %r",
                    envelope.type,
                    envelope.id,
                    attempt,
                    error,
                )
                if not policy.retries(error):
                    await self._dead_letter(
                        delivery,
                        queue,
                        "not-retryable",
                        error=error,
                        attempts=attempt,
                        envelope=envelope,
                        first_failure=first_failure,
                        span=span,
                    )
                    return
                if immediate + 1 < calls_per_round:
                    continue
                delay = policy.delay_after(round_number)
                if delay is None:
                    await self._dead_letter(
                        delivery,
                        queue,
                        "handler-failed",
                        error=error,
                        attempts=attempt,
                        envelope=envelope,
                        first_failure=first_failure,
                        span=span,
                    )
                    return
                self.stats.retries_scheduled += 1
                if span is not None:
                    span.retrying("handler-failed", delay, error)
                headers = dict(delivery.headers)
                headers[ATTEMPT] = str(round_number + 1)
                headers[FAULT_PREFIX + "first-time"] = first_failure
                await _settled(span, "retry", delivery.retry_later(delay, headers))
                return
            else:
                await _settled(span, "ack", delivery.ack())
                self.stats.handled += 1
                if self._outage_streak:
                    self._outage_streak = 0
                    self._outage.up()
                return

    def _outage_delay(self, error: BaseException, queue: str) -> float:
        """Count an unavailable attempt and say how long its message waits (one log line an outage)."""
        self.stats.unavailable += 1
        self._outage_streak += 1
        # One WARNING when the outage starts, one INFO when a message is handled again.
        quiet = isinstance(error, TransportError) and self.sender.transport.in_outage
        self._outage.down(f"{error}; messages go back to {queue} for later", quiet=quiet)
        return capped_exponential(UNAVAILABLE_DELAY, MAX_UNAVAILABLE_DELAY, self._outage_streak - 1)

    async def _call(self, ctx: Context, message: Message, registration: Registration) -> Any:
        middleware = self.handlers.middleware
        if not middleware:  # the common case: no wrapping closures per message
            return await registration.handler(message, ctx)

        async def call_handler(ctx: Context, message: Message) -> Any:
            return await registration.handler(message, ctx)

        call: Next = call_handler
        for wrap in reversed(middleware):
            call = _bind(wrap, call)
        return await call(ctx, message)

    async def _dead_letter(
        self,
        delivery: Delivery,
        queue: str,
        reason: str,
        *,
        error: BaseException | None = None,
        detail: str | None = None,
        attempts: int = 0,
        envelope: Envelope | None = None,
        first_failure: str | None = None,
        span: Processing | None = None,
    ) -> None:
        log.warning(
            "%s: dead-lettering %s %s from queue %s: %s (%s)",
            self.service,
            delivery.headers.get("type", "a message"),
            delivery.headers.get("id", "without an id"),
            queue,
            reason,
            detail or (repr(error) if error is not None else "no detail"),
            extra={"reason": reason},
        )
        original = dict(delivery.headers)
        if first_failure is not None:
            original[FAULT_PREFIX + "first-time"] = first_failure
        headers = fault_headers(
            original,
            reason=reason,
            service=self.service,
            queue=queue,
            attempts=attempts,
            error=error,
            detail=detail,
        )
        if span is not None:
            span.dead_lettered(reason, error)
        await _settled(span, "dead_letter", delivery.dead_letter(headers))
        self.stats.dead_lettered += 1
        if envelope is not None and self.on_dead_letter is not None:
            await self.on_dead_letter(envelope, headers)


def _settled(span: Processing | None, operation: str, settling: Awaitable[None]) -> Awaitable[None]:
    """`settling`, recorded (once awaited) as the `operation` that settles what `span` processes."""
    return settling if span is None else traced(span.settle(operation), settling)


def _bind(middleware: Middleware, call_next: Next) -> Next:
    async def call(ctx: Context, message: Message) -> Any:
        return await middleware(ctx, message, call_next)

    return call


def _round_of(headers: Mapping[str, str]) -> int:
    try:
        return max(1, int(headers.get(ATTEMPT, "1")))
    except ValueError:
        return 1
