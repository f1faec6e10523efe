"""The telemetry port on OpenTelemetry: spans and metrics by the messaging semantic conventions.

Follows the messaging conventions of OpenTelemetry semantic conventions v1.44.0 (`docs/messaging/`
there; docs/observability.md here says what is emitted). Like an instrumented library it uses the
global tracer and meter providers unless it is given its own:

    Bus("basket", telemetry=True)                                       # the global providers
    Bus("basket", telemetry=OpenTelemetry(tracer_provider=tp, meter_provider=mp))

While no SDK is configured (the API's proxy or no-op providers are the global ones) it records
nothing and looks again at most once a second, so the bus path pays a clock read per operation;
an SDK configured later is picked up within that second.

Trace structure: the creation context of a message is the PRODUCER span that made it (`publish E`
or `send q` straight to the transport, `create q` when it is written to the outbox) and travels in
its `traceparent` header, stored with the outbox row. The relay's `send q` is a CLIENT span, child
of that context and linked to it. The consumer's `process q` span (CONSUMER) has the creation
context as its parent and a link to it; settling is a CLIENT span (`ack q`, `retry q`,
`dead_letter q`) under it, retries and dead letters are events on it with their reason code.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import metadata as _metadata
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer, TracerProvider

from tidings.envelope import Envelope
from tidings.errors import RequestTimeout
from tidings.telemetry.ids import TRACEPARENT
from tidings.telemetry.port import Operation, OutboxGauges, Processing, Sending, Telemetry

__all__ = ["DURATION_BUCKETS", "SCHEMA_URL", "OpenTelemetry"]

#: The semantic conventions these spans and metrics follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
#: The buckets the conventions advise for `messaging.client.operation.duration` and
#: `messaging.process.duration`, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_SCOPE = "tidings"
try:
    _VERSION: str | None = _metadata.version("tidings")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = None

#: Seconds between looks for a global SDK provider while none is set.
_RECHECK_INTERVAL = 1.0
# requests.py names each bus instance's reply queue `{service}.replies.{12 hex digits}`: a
# temporary queue, one per instance, whose name must not reach span names or metric attributes.
_REPLY_QUEUE = re.compile(r"^(?P<service>.+)\.replies\.[0-9a-f]+$")
# Destinations seen, with their attributes worked out once; reply queues come and go with the
# instances that asked, so the cache is emptied when it grows past this.
_MAX_CACHED_DESTINATIONS = 1024

_SYSTEM = "messaging.system"
_OPERATION_TYPE = "messaging.operation.type"
_OPERATION_NAME = "messaging.operation.name"
_DESTINATION = "messaging.destination.name"
_TEMPLATE = "messaging.destination.template"
_TEMPORARY = "messaging.destination.temporary"
_GROUP = "messaging.consumer.group.name"
_MESSAGE_ID = "messaging.message.id"
_CONVERSATION = "messaging.message.conversation_id"
_BODY_SIZE = "messaging.message.body.size"
_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
_ERROR_TYPE = "error.type"
_MESSAGE_TYPE = "tidings.message.type"
_SERVICE = "tidings.service"
#: The span attributes of a delivery read from its headers (CloudEvents attributes).
_FROM_HEADERS = (("id", _MESSAGE_ID), ("correlationid", _CONVERSATION), ("type", _MESSAGE_TYPE))


def error_type(error: BaseException) -> str:
    """`error.type` of an exception: its class's qualified name (builtins without a module)."""
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


# -- what the transport is --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _System:
    """`messaging.system` and what the names on the wire depend on, for one transport."""

    name: str
    #: RabbitMQ: the namespace every exchange and queue name starts with; None elsewhere.
    namespace: str | None = None
    #: `server.address` and `server.port`, where there is a server.
    server: tuple[tuple[str, str | int], ...] = ()


def _describe(transport: Any) -> _System:
    url = str(getattr(transport, "url", "") or "")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("amqp", "amqps"):
        settings = getattr(transport, "settings", None)
        namespace = str(getattr(settings, "namespace", "tidings"))
        parts = urlsplit(url)  # the redacted URL: the host and port are all that is read
        server: tuple[tuple[str, str | int], ...] = ()
        if parts.hostname:
            port = parts.port or (5671 if scheme == "amqps" else 5672)
            server = (("server.address", parts.hostname), ("server.port", port))
        return _System("rabbitmq", namespace, server)
    if scheme in ("sqlite", "memory"):
        return _System(f"tidings.{scheme}")
    # A transport of the application's own: named after its scheme, or its class.
    return _System(f"tidings.{scheme or type(transport).__name__.lower()}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Destination:
    """A destination's attributes, worked out once: for spans, and low-cardinality for metrics."""

    #: What span names show: the destination's name, or its template when it is temporary.
    label: str
    #: The span attributes every operation on it shares.
    attributes: Mapping[str, str | int | bool]
    #: The metric attributes (`messaging.system`, the destination or its template, the server).
    metric: Mapping[str, str | int]


def _producer_destination(system: _System, event_type: str, queue: str | None) -> _Destination:
    """Where a message goes: an event to its wire name's subscribers, else a queue."""
    target = event_type if queue is None else queue
    reply = _REPLY_QUEUE.match(target) if queue is not None else None
    template = f"{reply['service']}.replies.{{instance}}" if reply else None
    if system.namespace is not None:
        # RabbitMQ: `{exchange}:{routing key}`, the exchange the transport publishes to.
        exchange = f"{system.namespace}.{'events' if queue is None else 'commands'}"
        name = f"{exchange}:{target}"
        template = f"{exchange}:{template}" if template else None
    else:
        name = target
    attributes: dict[str, str | int | bool] = {
        _SYSTEM: system.name,
        _DESTINATION: name,
        **dict(system.server),
    }
    if system.namespace is not None:
        attributes[_ROUTING_KEY] = target
    if template is not None:
        attributes[_TEMPLATE] = template
        attributes[_TEMPORARY] = True
    metric: dict[str, str | int] = {_SYSTEM: system.name, **dict(system.server)}
    metric[_TEMPLATE if template else _DESTINATION] = template or name
    return _Destination(template or name, attributes, metric)


def _consumer_destination(system: _System, service: str, queue: str) -> _Destination:
    """The queue a delivery came from (through which exchange, the consumer does not know)."""
    reply = _REPLY_QUEUE.match(queue)
    template = f"{reply['service']}.replies.{{instance}}" if reply else None
    if system.namespace is not None:
        name = f"{system.namespace}.{queue}"
        template = f"{system.namespace}.{template}" if template else None
    else:
        name = queue
    attributes: dict[str, str | int | bool] = {
        _SYSTEM: system.name,
        _DESTINATION: name,
        **dict(system.server),
    }
    metric: dict[str, str | int] = {_SYSTEM: system.name, **dict(system.server)}
    if template is not None:
        attributes[_TEMPLATE] = template
        attributes[_TEMPORARY] = True
        metric[_TEMPLATE] = template
    else:
        # The instances of a service share its queue: the service is the consumer group.
        attributes[_GROUP] = service
        metric[_GROUP] = service
        metric[_DESTINATION] = name
    return _Destination(template or name, attributes, metric)


# -- the instruments ----------------------------------------------------------------------------


class _Instruments:
    """The metrics of every bus on one meter provider (made once per provider)."""

    def __init__(self, meter: Meter) -> None:
        self.operation_duration = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Duration of messaging operation initiated by a producer or consumer client.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing operation.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.sent = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Number of messages producer attempted to send to the broker.",
        )
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Number of messages that were delivered to the application.",
        )
        self.retries = meter.create_counter(
            "tidings.retries.scheduled",
            unit="{message}",
            description="Messages put back on their queue for a later attempt, by reason.",
        )
        self.dead_letters = meter.create_counter(
            "tidings.dead_letters",
            unit="{message}",
            description="Messages moved to an error queue, by reason code.",
        )
        self.duplicates = meter.create_counter(
            "tidings.inbox.duplicates",
            unit="{message}",
            description="Messages the inbox acknowledged without a handler call: handled before.",
        )
        self.timeouts = meter.create_counter(
            "tidings.requests.timeouts",
            unit="{request}",
            description="Requests that got no reply within their timeout.",
        )
        self.late_replies = meter.create_counter(
            "tidings.requests.late_replies",
            unit="{message}",
            description="Replies no request waited for any more (after the timeout, or twice).",
        )
        #: The relays' last looks at their outboxes (a relay's bus gone, its gauges go too).
        self.gauges: weakref.WeakSet[OutboxGauges] = weakref.WeakSet()
        meter.create_observable_gauge(
            "tidings.outbox.backlog",
            callbacks=[self._backlog],
            unit="{message}",
            description="Outbox rows not sent yet, at the relay's last look.",
        )
        meter.create_observable_gauge(
            "tidings.outbox.oldest_age",
            callbacks=[self._oldest_age],
            unit="s",
            description="Age of the oldest outbox row not sent yet (0 when none is waiting).",
        )

    def _backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        # Called from the metric reader's thread: the set is copied before it is read.
        return [
            Observation(gauges.rows, {_SERVICE: gauges.service})
            for gauges in list(self.gauges)
            if gauges.rows is not None
        ]

    def _oldest_age(self, options: CallbackOptions) -> Iterable[Observation]:
        now = datetime.now(UTC)
        return [
            Observation(
                max(0.0, (now - gauges.oldest).total_seconds()) if gauges.oldest is not None else 0.0,
                {_SERVICE: gauges.service},
            )
            for gauges in list(self.gauges)
            if gauges.rows is not None
        ]


# A provider gets one set of instruments, whichever buses share it (an instrument made twice on
# one meter is a duplicate the SDK warns about, and its second callbacks would never be called).
_instruments_lock = threading.Lock()
_instruments_by_provider: dict[int, tuple[MeterProvider, _Instruments]] = {}


def _instruments_of(provider: MeterProvider) -> _Instruments:
    with _instruments_lock:
        found = _instruments_by_provider.get(id(provider))
        if found is None or found[0] is not provider:
            meter = provider.get_meter(_SCOPE, _VERSION, schema_url=SCHEMA_URL)
            found = (provider, _Instruments(meter))
            _instruments_by_provider[id(provider)] = found
        return found[1]


def _api_only(provider: object) -> bool:
    """True for the API's own providers (proxy or no-op): no SDK behind them, nothing recorded."""
    return type(provider).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))


# -- the handles --------------------------------------------------------------------------------


def _failed(span: Span | None, kind: str, description: str | None = None) -> None:
    if span is not None:
        span.set_attribute(_ERROR_TYPE, kind)
        span.set_status(StatusCode.ERROR, description)


class _Produce:
    """A message going out: its span (if tracing) and its duration and count (if metrics)."""

    __slots__ = ("_duration", "_instruments", "_sent", "_span", "_started", "envelope")

    def __init__(
        self,
        envelope: Envelope,
        span: Span | None,
        instruments: _Instruments | None,
        duration: Mapping[str, str | int],
        sent: Mapping[str, str | int] | None,
    ) -> None:
        self.envelope = envelope
        self._span = span
        self._instruments = instruments
        self._duration = duration
        self._sent = sent
        self._started = time.perf_counter()

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _failed(self._span, error_type(error), str(error))
        if self._span is not None:
            self._span.end()
        instruments = self._instruments
        if instruments is not None:
            duration, sent = self._duration, self._sent
            if error is not None:
                duration = {**duration, _ERROR_TYPE: error_type(error)}
                sent = {**sent, _ERROR_TYPE: error_type(error)} if sent is not None else None
            instruments.operation_duration.record(time.perf_counter() - self._started, duration)
            if sent is not None:
                instruments.sent.add(1, sent)


class _Request:
    """A request: the send and the wait for its reply, current while it lasts."""

    __slots__ = ("_instruments", "_metric", "_span", "_token")

    def __init__(
        self, span: Span | None, instruments: _Instruments | None, metric: Mapping[str, str | int]
    ) -> None:
        self._span = span
        self._instruments = instruments
        self._metric = metric
        # Current until it ends: the send span and everything the request causes are its children.
        self._token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None

    def end(self, error: BaseException | None = None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        if error is not None:
            _failed(self._span, error_type(error), str(error))
            if isinstance(error, RequestTimeout) and self._instruments is not None:
                self._instruments.timeouts.add(1, self._metric)
        if self._span is not None:
            self._span.end()


class _Settle:
    """Settling one delivery: a CLIENT span under its processing, and the operation's duration."""

    __slots__ = ("_duration", "_instruments", "_owner", "_span", "_started")

    def __init__(
        self,
        owner: _Processing,
        span: Span | None,
        instruments: _Instruments | None,
        duration: Mapping[str, str | int],
    ) -> None:
        self._owner = owner
        self._span = span
        self._instruments = instruments
        self._duration = duration
        self._started = time.perf_counter()

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _failed(self._span, error_type(error), str(error))
            self._owner.fail(error_type(error))
        if self._span is not None:
            self._span.end()
        if self._instruments is not None:
            attributes = (
                self._duration if error is None else {**self._duration, _ERROR_TYPE: error_type(error)}
            )
            self._instruments.operation_duration.record(time.perf_counter() - self._started, attributes)


class _Processing:
    """One delivery's processing: the CONSUMER span (current until it ends) and its metrics."""

    __slots__ = (
        "_destination",
        "_error",
        "_instruments",
        "_message_id",
        "_span",
        "_started",
        "_token",
        "_tracer",
    )

    def __init__(
        self,
        tracer: Tracer | None,
        instruments: _Instruments | None,
        destination: _Destination,
        span: Span | None,
        message_id: str | None,
    ) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._destination = destination
        self._span = span
        self._message_id = message_id
        self._error: str | None = None
        self._token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
        self._started = time.perf_counter()

    def fail(self, kind: str, description: str | None = None) -> None:
        """The processing failed (the first failure recorded is the one it is known by)."""
        if self._error is None:
            self._error = kind
            _failed(self._span, kind, description)

    def settle(self, operation: str) -> Operation:
        span = None
        if self._tracer is not None and self._span is not None:
            attributes: dict[str, str | int | bool] = {
                **self._destination.attributes,
                _OPERATION_TYPE: "settle",
                _OPERATION_NAME: operation,
            }
            if self._message_id is not None:
                attributes[_MESSAGE_ID] = self._message_id
            span = self._tracer.start_span(
                f"{operation} {self._destination.label}",
                context=trace.set_span_in_context(self._span),
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
        duration = {**self._destination.metric, _OPERATION_TYPE: "settle", _OPERATION_NAME: operation}
        return _Settle(self, span, self._instruments, duration)

    def attempt_failed(self, error: BaseException, attempt: int) -> None:
        if self._span is not None:
            self._span.record_exception(error, {"tidings.attempt": attempt})

    def retrying(self, reason: str, delay: float, error: BaseException | None = None) -> None:
        if error is not None:
            self.fail(error_type(error), str(error))
        if self._span is not None:
            self._span.add_event(
                "tidings.retry_scheduled", {"tidings.retry.reason": reason, "tidings.retry.delay": delay}
            )
        if self._instruments is not None:
            self._instruments.retries.add(1, {**self._destination.metric, "tidings.retry.reason": reason})

    def dead_lettered(self, reason: str, error: BaseException | None = None) -> None:
        self.fail(error_type(error) if error is not None else reason, str(error) if error else reason)
        if self._span is not None:
            self._span.add_event("tidings.dead_lettered", {"tidings.fault.reason": reason})
        if self._instruments is not None:
            self._instruments.dead_letters.add(
                1, {**self._destination.metric, "tidings.fault.reason": reason}
            )

    def end(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if self._span is not None:
            self._span.end()
        if self._instruments is not None:
            attributes = {**self._destination.metric, _OPERATION_TYPE: "process", _OPERATION_NAME: "process"}
            if self._error is not None:
                attributes[_ERROR_TYPE] = self._error
            self._instruments.process_duration.record(time.perf_counter() - self._started, attributes)


class _Gauges(OutboxGauges):
    """Gauges that are wanted while the meter provider is an SDK's."""

    __slots__ = ("_owner",)

    def __init__(self, service: str, owner: OpenTelemetry) -> None:
        super().__init__(service)
        self._owner = owner

    def wanted(self) -> bool:
        return self._owner.live_instruments() is not None


# -- the implementation ---------------------------------------------------------------------------


class OpenTelemetry(Telemetry):
    """Spans and metrics on OpenTelemetry providers: the global ones unless given others."""

    def __init__(
        self, *, tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None
    ) -> None:
        self._tracer: Tracer | None = (
            tracer_provider.get_tracer(_SCOPE, _VERSION, schema_url=SCHEMA_URL) if tracer_provider else None
        )
        self._instruments: _Instruments | None = _instruments_of(meter_provider) if meter_provider else None
        # Given no provider, look at the global ones (until one is an SDK's, then keep it).
        self._global_tracer = tracer_provider is None
        self._global_meter = meter_provider is None
        self._tracer_looked_at = self._meter_looked_at = -_RECHECK_INTERVAL
        #: While neither provider is an SDK's: the clock time before which nothing is looked at
        #: again (0: something records, or it is time to look). The one check on the hot path.
        self._quiet_until = 0.0
        self._gauges: list[OutboxGauges] = []
        self._system_of: tuple[Any, _System] | None = None
        self._destinations: dict[tuple[object, ...], _Destination] = {}

    # -- the providers ------------------------------------------------------------------------

    def live_tracer(self) -> Tracer | None:
        """The tracer to record with, or None while no SDK is configured."""
        tracer = self._tracer
        if tracer is not None or not self._global_tracer:
            return tracer
        now = time.monotonic()
        if now - self._tracer_looked_at < _RECHECK_INTERVAL:
            return None
        self._tracer_looked_at = now
        provider = trace.get_tracer_provider()
        if _api_only(provider):
            return None
        self._tracer = provider.get_tracer(_SCOPE, _VERSION, schema_url=SCHEMA_URL)
        return self._tracer

    def live_instruments(self) -> _Instruments | None:
        """The instruments to record with, or None while no SDK is configured."""
        instruments = self._instruments
        if instruments is not None:
            return instruments
        if not self._global_meter:
            return None
        now = time.monotonic()
        if now - self._meter_looked_at < _RECHECK_INTERVAL:
            return None
        self._meter_looked_at = now
        provider = metrics.get_meter_provider()
        if _api_only(provider):
            return None
        instruments = self._instruments = _instruments_of(provider)
        for gauges in self._gauges:
            instruments.gauges.add(gauges)
        return instruments

    def _live(self) -> tuple[Tracer | None, _Instruments | None] | None:
        """The tracer and the instruments, or None (and quiet for a while) when neither records."""
        tracer, instruments = self.live_tracer(), self.live_instruments()
        if tracer is None and instruments is None:
            self._quiet_until = time.monotonic() + _RECHECK_INTERVAL
            return None
        self._quiet_until = 0.0
        return tracer, instruments

    def _quiet(self) -> bool:
        quiet_until = self._quiet_until
        return bool(quiet_until) and time.monotonic() < quiet_until

    def _system(self, transport: Any) -> _System:
        known = self._system_of
        if known is not None and known[0] is transport:
            return known[1]
        system = _describe(transport)
        self._system_of = (transport, system)
        return system

    def _cached(self, key: tuple[object, ...]) -> _Destination | None:
        if len(self._destinations) >= _MAX_CACHED_DESTINATIONS:
            self._destinations.clear()
        return self._destinations.get(key)

    def _to(self, system: _System, event_type: str, queue: str | None) -> _Destination:
        """Where a message goes: an event (`queue` None) to its type's subscribers, else `queue`."""
        key = (system, "to", event_type if queue is None else None, queue)
        found = self._cached(key)
        if found is None:
            found = self._destinations[key] = _producer_destination(system, event_type, queue)
        return found

    def _from(self, system: _System, service: str, queue: str) -> _Destination:
        """The queue `service` consumes a delivery from."""
        key = (system, "from", service, queue)
        found = self._cached(key)
        if found is None:
            found = self._destinations[key] = _consumer_destination(system, service, queue)
        return found

    # -- producing ------------------------------------------------------------------------------

    # Each entry point checks `_quiet_until` inline: with the API and no SDK that check is all
    # the bus path pays (docs/benchmarks.md, "Telemetry").

    def sending(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        quiet_until = self._quiet_until
        if quiet_until and time.monotonic() < quiet_until:
            return None
        return self._produce(transport, envelope, queue, "send")

    def creating(self, transport: Any, envelope: Envelope, queue: str | None) -> Sending | None:
        return None if self._quiet() else self._produce(transport, envelope, queue, "create")

    def relaying(self, transport: Any, envelope: Envelope, queue: str | None) -> Operation | None:
        return None if self._quiet() else self._produce(transport, envelope, queue, "relay")

    def _produce(self, transport: Any, envelope: Envelope, queue: str | None, how: str) -> _Produce | None:
        live = self._live()
        if live is None:
            return None
        tracer, instruments = live
        system = self._system(transport)
        destination = self._to(system, envelope.type, queue)
        operation_type = "create" if how == "create" else "send"
        operation_name = "create" if how == "create" else ("publish" if queue is None else "send")
        span = None
        if tracer is not None:
            span, envelope = self._producer_span(tracer, envelope, destination, how, operation_name)
        metric = destination.metric
        duration = {**metric, _OPERATION_TYPE: operation_type, _OPERATION_NAME: operation_name}
        # Sent is counted where the message reaches the transport, never where the outbox took it.
        sent = None if how == "create" else {**metric, _OPERATION_NAME: operation_name}
        return _Produce(envelope, span, instruments, duration, sent)

    def _producer_span(
        self, tracer: Tracer, envelope: Envelope, destination: _Destination, how: str, operation_name: str
    ) -> tuple[Span | None, Envelope]:
        attributes: dict[str, str | int | bool] = {
            **destination.attributes,
            _OPERATION_TYPE: "create" if how == "create" else "send",
            _OPERATION_NAME: operation_name,
            _MESSAGE_ID: envelope.id,
            _BODY_SIZE: len(envelope.body),
            _MESSAGE_TYPE: envelope.type,
        }
        if envelope.correlation_id is not None:
            attributes[_CONVERSATION] = envelope.correlation_id
        name = f"{operation_name} {destination.label}"
        carried = TRACEPARENT in envelope.headers
        if how == "relay":
            # The row's stored creation context is the parent (the relay's own loop has none) and,
            # as the conventions ask of every send span, a link.
            creation = trace.get_current_span(propagate.extract(envelope.headers)).get_span_context()
            if not creation.is_valid:
                return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes), envelope
            return tracer.start_span(
                name,
                context=trace.set_span_in_context(trace.NonRecordingSpan(creation)),
                kind=SpanKind.CLIENT,
                attributes=attributes,
                links=[Link(creation)],
            ), envelope
        if carried:
            # A creation context the application put in the message is kept as it is: no create
            # span; a send span that links to it.
            if how == "create":
                return None, envelope
            creation = trace.get_current_span(propagate.extract(envelope.headers)).get_span_context()
            links = [Link(creation)] if creation.is_valid else None
            return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes, links=links), envelope
        span = tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)
        headers = dict(envelope.headers)
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return span, dataclasses.replace(envelope, headers=headers)

    def requesting(self, transport: Any, envelope: Envelope, queue: str) -> Operation | None:
        live = None if self._quiet() else self._live()
        if live is None:
            return None
        tracer, instruments = live
        system = self._system(transport)
        destination = self._to(system, envelope.type, queue)
        span = None
        if tracer is not None:
            attributes: dict[str, str | int | bool] = {
                **destination.attributes,
                _MESSAGE_ID: envelope.id,
                _MESSAGE_TYPE: envelope.type,
            }
            if envelope.correlation_id is not None:
                attributes[_CONVERSATION] = envelope.correlation_id
            span = tracer.start_span(f"request {destination.label}", attributes=attributes)
        metric = {**destination.metric, _MESSAGE_TYPE: envelope.type}
        return _Request(span, instruments, metric)

    # -- consuming ------------------------------------------------------------------------------

    def processing(
        self, transport: Any, service: str, headers: Mapping[str, str], body: bytes, queue: str
    ) -> Processing | None:
        quiet_until = self._quiet_until
        if quiet_until and time.monotonic() < quiet_until:
            return None
        live = self._live()
        if live is None:
            return None
        tracer, instruments = live
        system = self._system(transport)
        destination = self._from(system, service, queue)
        if instruments is not None:
            instruments.consumed.add(1, {**destination.metric, _OPERATION_NAME: "process"})
        message_id = headers.get("id")
        span = None
        if tracer is not None:
            attributes: dict[str, str | int | bool] = {
                **destination.attributes,
                _OPERATION_TYPE: "process",
                _OPERATION_NAME: "process",
                _BODY_SIZE: len(body),
            }
            # Read before the envelope is: a message too broken to decode is still processed
            # (into the error queue), and its span says so.
            for key, attribute in (
                ("id", _MESSAGE_ID),
                ("correlationid", _CONVERSATION),
                ("type", _MESSAGE_TYPE),
            ):
                value = headers.get(key)
                if isinstance(value, str):
                    attributes[attribute] = value
            span = self._consumer_span(tracer, f"process {destination.label}", headers, attributes)
        return _Processing(tracer, instruments, destination, span, message_id)

    def _consumer_span(
        self, tracer: Tracer, name: str, headers: Mapping[str, str], attributes: dict[str, str | int | bool]
    ) -> Span:
        creation_context = propagate.extract(headers)
        creation = trace.get_current_span(creation_context).get_span_context()
        ambient = trace.get_current_span().get_span_context()
        links = []
        if creation.is_valid:
            links.append(Link(creation))
        if ambient.is_valid and creation.is_valid:
            # The creation context is the parent; the span the consumer runs in (a bus run inside
            # one) is kept as a link, as the conventions ask.
            links.append(Link(ambient))
        return tracer.start_span(
            name,
            context=creation_context if creation.is_valid else None,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )

    def duplicate(self, service: str, queue: str) -> None:
        self._count_and_note("tidings.duplicate", "duplicates", service, queue)

    def late_reply(self, service: str, queue: str) -> None:
        self._count_and_note("tidings.late_reply", "late_replies", service, queue)

    def _count_and_note(self, event: str, counter: str, service: str, queue: str) -> None:
        live = None if self._quiet() else self._live()
        if live is None:
            return
        tracer, instruments = live
        if tracer is not None:
            trace.get_current_span().add_event(event)
        if instruments is not None and self._system_of is not None:
            destination = self._from(self._system_of[1], service, queue)
            getattr(instruments, counter).add(1, destination.metric)

    # -- the outbox -----------------------------------------------------------------------------

    def outbox_gauges(self, service: str) -> OutboxGauges | None:
        gauges = _Gauges(service, self)
        self._gauges.append(gauges)
        if self._instruments is not None:
            self._instruments.gauges.add(gauges)
        return gauges
