"""An AsyncAPI 3.0.0 document of a system of services, from their buses: `asyncapi_document(buses)`.

Pure: it reads the buses (never opens them) and returns a dict ready for `json.dumps`. What maps
to what (docs/asyncapi.md):

- channels: one per service queue (`queue.<service>`: the commands and replies it handles, and
  the commands routed to it), one per event type (`event.<wire name>`: the event's routing key),
  and `replies`, the requesters' reply queues (named at run time, in `tidings-reply-to`);
- operations, per service: `receive` for each type it subscribes to or handles (with the replies
  its handler's return annotation names), `send` for each command it routes (`Bus.route`) and
  each event it declared it publishes (`Bus.declare_publishes`);
- messages: one per wire name, the payload the JSON Schema of its Pydantic model as tidings writes
  it (serialization mode), the headers the CloudEvents attributes as the transport carries them;
- on RabbitMQ, the server and the AMQP bindings (0.3.0) of the channels and operations: the
  exchanges, queues and routing keys of docs/rabbitmq.md.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic.json_schema import models_json_schema

from tidings.bus import Bus
from tidings.errors import ConfigurationError
from tidings.faults import MAX_MESSAGE
from tidings.headers import ATTEMPT, FAULT_PREFIX, REPLY_TO, REQUEST_ID
from tidings.messages import Event, Message, Reply, wire_name_of
from tidings.requests import FAULT_REPLY_TYPE

if typing.TYPE_CHECKING:
    from tidings.transports.rabbitmq.topology import Topology

__all__ = ["AMQP_BINDING_VERSION", "ASYNCAPI_VERSION", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
#: The AMQP bindings version the document's `bindings.amqp` objects follow.
AMQP_BINDING_VERSION = "0.3.0"
_JSON = "application/json"
_SCHEMAS = "#/components/schemas/"
# Ids of channels, operations and components: AsyncAPI allows these characters only.
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")
_HEADERS_SCHEMA = "tidings.Headers"
_FAULT_MESSAGE = "tidings.fault"


def asyncapi_document(
    buses: Sequence[Bus], *, title: str | None = None, version: str = "0.1.0", description: str | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the services these buses are (one bus per service).

    The buses must share one system: the same transport, and on RabbitMQ the same broker, vhost
    and namespace; otherwise, or given two buses of one service, `ConfigurationError`.
    """
    if not buses:
        raise ConfigurationError("an AsyncAPI document needs at least one bus")
    services = [bus.service for bus in buses]
    if len(set(services)) < len(services):
        twice = sorted({name for name in services if services.count(name) > 1})
        raise ConfigurationError(f"one bus per service: {', '.join(twice)} given more than once")
    system = _system_of(buses[0])
    for bus in buses[1:]:
        other = _system_of(bus)
        if other.key != system.key:
            raise ConfigurationError(
                f"the buses are on different systems: {buses[0].service!r} on {system.shown}, "
                f"{bus.service!r} on {other.shown}"
            )
    return _Document(buses, system).build(
        title=title or f"tidings: {', '.join(services)}",
        version=version,
        description=description,
    )


@dataclass(frozen=True, slots=True)
class _System:
    """The transport the services share, as far as the document tells it."""

    kind: str
    #: What must match between the buses of one document.
    key: tuple[str, ...]
    #: The transport as errors show it (no password).
    shown: str
    topology: Topology | None = None
    host: str = ""
    vhost: str = "/"

    @property
    def amqp(self) -> bool:
        return self.topology is not None


def _system_of(bus: Bus) -> _System:
    transport = bus.transport
    url = transport.url
    scheme = urlsplit(url).scheme.lower() if "://" in url else type(transport).__name__
    # Imported only for a bus on RabbitMQ: the package needs aio-pika (the `rabbitmq` extra).
    if type(transport).__module__.startswith("tidings.transports.rabbitmq."):
        from tidings.transports.rabbitmq import RabbitMQTransport

        if isinstance(transport, RabbitMQTransport):
            parts = urlsplit(transport.settings.broker_url)
            scheme = parts.scheme.lower()
            port = parts.port or (5671 if scheme == "amqps" else 5672)
            host = f"{parts.hostname}:{port}"
            vhost = unquote(parts.path[1:]) or "/"
            namespace = transport.settings.namespace
            return _System(
                kind=scheme,
                key=(scheme, host, vhost, namespace),
                shown=f"{scheme}://{host} vhost {vhost!r} namespace {namespace!r}",
                topology=transport.topology,
                host=host,
                vhost=vhost,
            )
    return _System(kind=scheme, key=(scheme, url), shown=url)


class _Ids:
    """Ids safe for AsyncAPI (and JSON pointers), one per thing, unique in their map."""

    def __init__(self) -> None:
        self._given: dict[object, str] = {}
        self._taken: set[str] = set()

    def __call__(self, thing: object, wanted: str) -> str:
        if thing in self._given:
            return self._given[thing]
        base = _UNSAFE.sub("_", wanted)
        found, n = base, 1
        while found in self._taken:  # two names that differ only in unsafe characters
            n += 1
            found = f"{base}-{n}"
        self._taken.add(found)
        self._given[thing] = found
        return found


@dataclass(slots=True)
class _Channel:
    address: str | None
    title: str
    description: str
    bindings: dict[str, Any] | None
    #: Message id -> wire name, in the order first met.
    messages: dict[str, str]


class _Document:
    def __init__(self, buses: Sequence[Bus], system: _System) -> None:
        self.buses = buses
        self.system = system
        self.channel_ids = _Ids()
        self.operation_ids = _Ids()
        self.message_ids = _Ids()
        self.channels: dict[str, _Channel] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        #: One class per wire name: the first met, handlers (the owners) first.
        self.classes: dict[str, type[Message]] = {}
        self.replies_of: dict[str, list[type[Reply]]] = {}

    # -- the whole -------------------------------------------------------------------------

    def build(self, *, title: str, version: str, description: str | None) -> dict[str, Any]:
        for bus in self.buses:
            for name, registration in bus.registrations.items():
                self.classes.setdefault(name, registration.message_type)
                if not issubclass(registration.message_type, Event):
                    self.replies_of[name] = _replies_named_by(registration.handler)
        for bus in self.buses:
            for event_type in bus.publishes.values():
                self.classes.setdefault(wire_name_of(event_type), event_type)
            for command_type in bus.sender.routes.routed():
                self.classes.setdefault(wire_name_of(command_type), command_type)
        for name in sorted(self.replies_of):
            for reply_type in self.replies_of[name]:
                self.classes.setdefault(wire_name_of(reply_type), reply_type)
        for bus in self.buses:
            self._queue_channel(bus.service)
        for bus in self.buses:
            self._receives(bus)
            self._sends(bus)
        return self._document(title, version, description)

    def _document(self, title: str, version: str, description: str | None) -> dict[str, Any]:
        services = ", ".join(bus.service for bus in self.buses)
        document: dict[str, Any] = {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": title,
                "version": version,
                "description": description
                or (
                    f"The services {services} on the {self.system.kind} transport, as their tidings "
                    "buses declare them: what each subscribes to and handles, the commands it "
                    "routes, the events it declares it publishes."
                ),
            },
            "defaultContentType": _JSON,
        }
        if self.system.amqp:
            document["servers"] = {"rabbitmq": self._server()}
        channels = dict(sorted(self.channels.items(), key=lambda item: _channel_order(item[0])))
        document["channels"] = {key: self._channel_object(ch) for key, ch in channels.items()}
        document["operations"] = self.operations
        document["components"] = self._components()
        document["x-tidings-transport"] = self.system.kind
        return document

    # -- channels --------------------------------------------------------------------------

    def _queue_channel(self, service: str) -> str:
        key = self.channel_ids(("queue", service), f"queue.{service}")
        if key not in self.channels:
            topology = self.system.topology
            address = topology.queue(service) if topology else service
            if topology:
                description = (
                    f"The queue of service `{service}`: commands and replies sent to it, through "
                    f"exchange `{topology.commands_exchange}` (direct) with routing key `{service}`. "
                    f"The events it subscribes to arrive here too, through "
                    f"`{topology.events_exchange}` (the event channels). What fails for good goes to "
                    f"`{topology.error_queue(service)}`."
                )
                bindings = {"amqp": self._queue_binding(address)}
            else:
                description = (
                    f"The queue of service `{service}`: commands and replies sent to it. The events "
                    f"it subscribes to arrive here too (the event channels); what fails for good goes to "
                    f"`{service}.error`."
                )
                bindings = None
            self.channels[key] = _Channel(address, f"{service}'s queue", description, bindings, {})
        return key

    def _event_channel(self, name: str) -> str:
        key = self.channel_ids(("event", name), f"event.{name}")
        if key not in self.channels:
            topology = self.system.topology
            if topology:
                description = (
                    f"Events `{name}`: published to exchange `{topology.events_exchange}` (topic) "
                    f"with routing key `{name}`; each subscribing service's queue is bound with it."
                )
                bindings: dict[str, Any] | None = {
                    "amqp": self._exchange_binding(topology.events_exchange, "topic")
                }
            else:
                description = f"Events `{name}`: a copy goes to the queue of every subscribing service."
                bindings = None
            self.channels[key] = _Channel(name, name, description, bindings, {})
        return key

    def _replies_channel(self) -> str:
        key = self.channel_ids("replies", "replies")
        if key not in self.channels:
            self.channels[key] = _Channel(
                None,  # each requesting instance's own temporary queue, named at run time
                "replies",
                f"The reply queue of the requesting instance, named in the request's `{REPLY_TO}` "
                f"header (`<service>.replies.<random>`, temporary). A request whose handler failed "
                f"for good gets the `{FAULT_REPLY_TYPE}` reply.",
                None,
                {},
            )
        return key

    def _channel_message(self, channel: str, name: str) -> str:
        message = self.message_ids(("message", name), name)
        self.channels[channel].messages.setdefault(message, name)
        return f"#/channels/{channel}/messages/{message}"

    def _channel_object(self, channel: _Channel) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": channel.address,
            "title": channel.title,
            "description": channel.description,
            "messages": {
                message: {"$ref": f"#/components/messages/{message}"} for message in channel.messages
            },
        }
        if channel.bindings:
            out["bindings"] = channel.bindings
        return out

    # -- operations ------------------------------------------------------------------------

    def _receives(self, bus: Bus) -> None:
        topology = self.system.topology
        for name, registration in bus.registrations.items():
            message_type = registration.message_type
            if issubclass(message_type, Event):
                channel = self._event_channel(name)
                where = (
                    f"queue `{topology.queue(bus.queue)}`, bound to `{topology.events_exchange}` "
                    f"with `{name}`"
                    if topology
                    else f"queue `{bus.queue}`"
                )
                summary = f"{bus.service} subscribes to {name}"
                description = f"Each `{name}` published reaches {where}."
            else:
                channel = self._queue_channel(bus.service)
                summary = f"{bus.service} handles {name}"
                description = f"`{bus.service}` owns `{name}`: commands of this type are sent to its queue."
            operation: dict[str, Any] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": summary,
                "description": description,
                "messages": [{"$ref": self._channel_message(channel, name)}],
            }
            if not issubclass(message_type, Event):
                reply = self._reply(name)
                if reply is not None:
                    operation["reply"] = reply
            if topology:
                operation["bindings"] = {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}}
            key = self.operation_ids(("receive", bus.service, name), f"{bus.service}.receive.{name}")
            self.operations[key] = operation

    def _sends(self, bus: Bus) -> None:
        topology = self.system.topology
        for command_type, to in bus.sender.routes.routed().items():
            name = wire_name_of(command_type)
            channel = self._queue_channel(to)
            how = f" through `{topology.commands_exchange}` with routing key `{to}`" if topology else ""
            operation: dict[str, Any] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"{bus.service} sends {name} to {to}",
                "description": (
                    f"`bus.route({command_type.__name__}, to={to!r})`: sent to `{to}`'s queue{how}; "
                    "refused with `NoRoute` when that queue does not exist."
                ),
                "messages": [{"$ref": self._channel_message(channel, name)}],
            }
            reply = self._reply(name)
            if reply is not None:
                operation["reply"] = reply  # when sent with bus.request()
            if topology:
                operation["bindings"] = {"amqp": self._publish_binding(to, mandatory=True)}
            key = self.operation_ids(("send", bus.service, name), f"{bus.service}.send.{name}")
            self.operations[key] = operation
        for name in bus.publishes:
            channel = self._event_channel(name)
            how = f" to `{topology.events_exchange}` with routing key `{name}`" if topology else ""
            operation = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"{bus.service} publishes {name}",
                "description": f"Published{how}: every subscribing service gets a copy.",
                "messages": [{"$ref": self._channel_message(channel, name)}],
            }
            if topology:
                operation["bindings"] = {"amqp": self._publish_binding(name, mandatory=False)}
            key = self.operation_ids(("send", bus.service, name), f"{bus.service}.send.{name}")
            self.operations[key] = operation

    def _reply(self, name: str) -> dict[str, Any] | None:
        """The reply of a command's handler (its return annotation), and the fault reply."""
        replies = self.replies_of.get(name)
        if not replies:
            return None
        channel = self._replies_channel()
        messages = [self._channel_message(channel, wire_name_of(reply)) for reply in replies]
        messages.append(self._channel_message(channel, FAULT_REPLY_TYPE))
        return {
            "address": {
                "location": f"$message.header#/{REPLY_TO}",
                "description": "the requesting instance's reply queue",
            },
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": ref} for ref in messages],
        }

    # -- AMQP bindings ---------------------------------------------------------------------

    def _server(self) -> dict[str, Any]:
        topology = self.system.topology
        assert topology is not None
        namespace = topology.settings.namespace
        return {
            "host": self.system.host,
            "protocol": self.system.kind,
            "protocolVersion": "0.9.1",
            "pathname": "/" + quote(self.system.vhost, safe=""),
            "description": (
                f"RabbitMQ, vhost `{self.system.vhost}`, namespace `{namespace}`: exchanges "
                f"`{topology.events_exchange}` (topic, events by wire name), "
                f"`{topology.commands_exchange}` (direct, commands and replies by queue name), "
                f"`{topology.errors_exchange}` (direct, dead letters) and `{topology.delayed_exchange}` "
                "(the delay cascade's way out), laid out as tidings' docs/rabbitmq.md says."
            ),
        }

    def _queue_binding(self, name: str) -> dict[str, Any]:
        queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False}
        return {
            "is": "queue",
            "queue": {**queue, "vhost": self.system.vhost},
            "bindingVersion": AMQP_BINDING_VERSION,
        }

    def _exchange_binding(self, name: str, kind: str) -> dict[str, Any]:
        exchange = {"name": name, "type": kind, "durable": True, "autoDelete": False}
        return {
            "is": "routingKey",
            "exchange": {**exchange, "vhost": self.system.vhost},
            "bindingVersion": AMQP_BINDING_VERSION,
        }

    def _publish_binding(self, routing_key: str, *, mandatory: bool) -> dict[str, Any]:
        # Persistent, confirmed; a command is mandatory (returned, NoRoute, when no queue has it).
        return {
            "cc": [routing_key],
            "deliveryMode": 2,
            "mandatory": mandatory,
            "bindingVersion": AMQP_BINDING_VERSION,
        }

    # -- components ------------------------------------------------------------------------

    def _components(self) -> dict[str, Any]:
        used = {
            message: name for channel in self.channels.values() for message, name in channel.messages.items()
        }
        ordered = sorted(used.items())
        models = [self.classes[name] for _, name in ordered if name in self.classes]
        refs, definitions = models_json_schema(
            [(model, "serialization") for model in models], ref_template=_SCHEMAS + "{model}"
        )
        schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
        headers_schema = _HEADERS_SCHEMA
        while headers_schema in schemas:  # a model of that very name
            headers_schema += "_"
        schemas[headers_schema] = self._headers_schema()
        messages: dict[str, Any] = {}
        for message, name in ordered:
            if name == FAULT_REPLY_TYPE and name not in self.classes:
                messages[message] = self._fault_message(headers_schema)
                continue
            model = self.classes[name]
            messages[message] = self._message(name, model, refs[(model, "serialization")], headers_schema)
        return {"schemas": schemas, "messages": messages}

    def _message(
        self, name: str, model: type[Message], payload: Mapping[str, Any], headers_schema: str
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "title": model.__name__,
            "contentType": _JSON,
            "headers": self._headers_of(name, headers_schema),
            "payload": dict(payload),
            "correlationId": {
                "description": "the conversation: the first message's id, kept by every message it causes",
                "location": f"$message.header#/{self._attribute('correlationid')}",
            },
            "x-tidings-kind": model.kind,
        }
        summary = _first_line(model.__doc__)
        if summary:
            out["summary"] = summary
        return out

    def _fault_message(self, headers_schema: str) -> dict[str, Any]:
        fault: dict[str, Any] = {
            f"{FAULT_PREFIX}{field}": {"type": "string", "description": text}
            for field, text in (
                (
                    "reason",
                    "the reason code: handler-failed, not-retryable, rejected, ... (docs/recoverability.md)",
                ),
                ("type", "the exception's class, module-qualified"),
                ("message", f"the exception's message (at most {MAX_MESSAGE} characters)"),
                ("attempts", "the handler calls made"),
                ("service", "the service whose handler failed"),
            )
        }
        headers = self._headers_of(FAULT_REPLY_TYPE, headers_schema)
        headers["allOf"][1]["properties"].update(fault)
        headers["allOf"][1]["required"] = [REQUEST_ID, f"{FAULT_PREFIX}reason"]
        return {
            "name": FAULT_REPLY_TYPE,
            "title": "Fault",
            "summary": "The request's handler failed for good: the requester's RemoteError.",
            "contentType": _JSON,
            "headers": headers,
            "payload": {"type": "object", "maxProperties": 0},
            "x-tidings-kind": "reply",
        }

    def _attribute(self, name: str) -> str:
        """The header a CloudEvents attribute travels in (the AMQP binding prefixes it)."""
        return f"cloudEvents_{name}" if self.system.amqp else name

    def _headers_of(self, name: str, headers_schema: str) -> dict[str, Any]:
        return {
            "allOf": [
                {"$ref": _SCHEMAS + headers_schema},
                {"type": "object", "properties": {self._attribute("type"): {"const": name}}},
            ]
        }

    def _headers_schema(self) -> dict[str, Any]:
        """The headers every tidings message carries: CloudEvents attributes (binary mode), ours."""
        attribute = self._attribute
        text = {"type": "string"}
        properties: dict[str, Any] = {
            attribute("id"): {**text, "description": "unique per message: a UUIDv7"},
            attribute("source"): {**text, "description": "the service that sent it"},
            attribute("type"): {**text, "description": "the wire name"},
            attribute("specversion"): {"const": "1.0"},
            attribute("time"): {**text, "format": "date-time", "description": "when it was made"},
            attribute("subject"): {**text, "description": "what it is about (the outbox orders by it)"},
            attribute("correlationid"): {**text, "description": "the conversation it belongs to"},
            attribute("causationid"): {**text, "description": "the id of the message that caused it"},
            attribute("traceparent"): {**text, "description": "W3C trace context"},
            attribute("tracestate"): {**text, "description": "W3C trace context"},
            REPLY_TO: {**text, "description": "on a request: the queue its reply goes to"},
            REQUEST_ID: {**text, "description": "on a reply: the id of the request it answers"},
            ATTEMPT: {**text, "description": "the round of delayed retries (absent: the first)"},
        }
        if not self.system.amqp:
            # The AMQP binding carries it as the content_type property, not as a header.
            properties["datacontenttype"] = {"const": _JSON}
        description = (
            "CloudEvents 1.0 attributes in binary content mode, then tidings' own headers; any "
            "other header is free-form and travels unchanged."
        )
        if self.system.amqp:
            description += " The id is the AMQP message_id too, the content type the content_type."
        return {
            "type": "object",
            "description": description,
            "properties": properties,
            "required": [attribute(name) for name in ("id", "source", "type", "specversion")],
            "additionalProperties": text,
        }


def _replies_named_by(handler: object) -> list[type[Reply]]:
    """The `Reply` classes a handler's return annotation names (`-> CheckoutResult`, unions too)."""
    try:
        if isinstance(handler, types.FunctionType | types.MethodType):
            hints = typing.get_type_hints(handler)
        else:  # a handler object: the annotation of its method
            hints = typing.get_type_hints(type(handler).__call__)
    except Exception:  # an annotation that does not resolve says nothing, and must not fail the document
        return []
    return [found for found in _types_in(hints.get("return")) if _is_reply(found)]


def _types_in(annotation: object) -> Iterable[object]:
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for argument in arguments:
            yield from _types_in(argument)
    else:
        yield annotation


def _is_reply(candidate: object) -> typing.TypeGuard[type[Reply]]:
    return isinstance(candidate, type) and issubclass(candidate, Reply) and candidate is not Reply


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def _channel_order(key: str) -> tuple[int, str]:
    # Queues first, then events, then the replies: the order a reader looks for them in.
    kind = 0 if key.startswith("queue.") else 1 if key.startswith("event.") else 2
    return kind, key
