"""The names and arguments of everything the RabbitMQ transport declares (docs/rabbitmq.md).

With the default namespace `tidings`, a service `basket` subscribed to `PriceChanged` has:

- exchange `tidings.events` (topic): events, routing key = wire name; `tidings.basket` is bound
  to it with `PriceChanged`.
- exchange `tidings.commands` (direct): commands and replies, routing key = queue name;
  `tidings.basket` is bound to it with `basket`.
- queue `tidings.basket`: quorum, `x-delivery-limit`, dead-lettered by the broker (a message over
  the limit) to exchange `tidings.errors` with routing key `basket`, where
- queue `tidings.basket.error` is bound with `basket`.
- the delay cascade `tidings.delay.v2.00` ... `.31` (see `Topology.delay_level`) and exchange
  `tidings.delayed` (topic), where
  `tidings.basket` is bound with `<32 words>.q.basket` and `<32 words>.e.PriceChanged`.

`describe_topology` and `describe_delay_cascade` give the same as data, with no broker
(`tidings topology`); `declarations` declares it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tidings.transports.base import error_queue_of
from tidings.transports.rabbitmq.settings import QueueType, RabbitMQSettings

__all__ = [
    "DELAY_LEVELS",
    "MAX_DELAY_MS",
    "Binding",
    "DelayKind",
    "Described",
    "Exchange",
    "Queue",
    "Topology",
    "describe_delay_cascade",
    "describe_topology",
]

#: The cascade has one level per bit of the delay in milliseconds.
DELAY_LEVELS = 32
#: RabbitMQ's TTL timers (Erlang timers) stop at 2^32 - 1 ms: about 49.7 days.
MAX_DELAY_MS = 2**DELAY_LEVELS - 1
# Error queues are only ever read back (listed, replayed); RabbitMQ 4 would otherwise apply its
# default delivery limit of 20 to them and drop a dead letter that was listed 20 times.
_NO_DELIVERY_LIMIT = 2**31 - 1
# A routing key holds at most 255 bytes; the delay prefix takes 66 of them.
_MAX_DESTINATION = 180


class DelayKind(StrEnum):
    """The word after the delay's bits in a routing key: where the message goes when due."""

    QUEUE = "q"  #: to the queue named by the last words (a command, a reply, a retry)
    EVENT = "e"  #: to every queue subscribed to the event named by the last words


@dataclass(frozen=True, slots=True)
class Topology:
    """Names, arguments and routing keys, all derived from the settings."""

    settings: RabbitMQSettings

    @property
    def events_exchange(self) -> str:
        return f"{self.settings.namespace}.events"

    @property
    def commands_exchange(self) -> str:
        return f"{self.settings.namespace}.commands"

    @property
    def errors_exchange(self) -> str:
        return f"{self.settings.namespace}.errors"

    @property
    def delayed_exchange(self) -> str:
        """Where the delay cascade hands a message over once it is due."""
        return f"{self.settings.namespace}.delayed"

    def queue(self, name: str) -> str:
        """The RabbitMQ name of the port's queue `name`."""
        return f"{self.settings.namespace}.{name}"

    def error_queue(self, name: str) -> str:
        return self.queue(error_queue_of(name))

    def queue_arguments(self, name: str, *, temporary: bool) -> dict[str, Any]:
        if temporary or self.settings.queue_type is QueueType.CLASSIC:
            # Classic queues count no deliveries, so there is no limit to enforce; the
            # dead-letter exchange still serves a consumer's basic.reject(requeue=False).
            return {
                "x-queue-type": "classic",
                "x-dead-letter-exchange": self.errors_exchange,
                "x-dead-letter-routing-key": name,
            }
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.settings.delivery_limit,
            "x-dead-letter-exchange": self.errors_exchange,
            "x-dead-letter-routing-key": name,
            # The broker confirms the move into the error queue before it forgets the message;
            # RabbitMQ requires reject-publish overflow for that strategy.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def error_queue_arguments(self, *, temporary: bool) -> dict[str, Any]:
        if temporary or self.settings.queue_type is QueueType.CLASSIC:
            return {"x-queue-type": "classic"}
        return {"x-queue-type": "quorum", "x-delivery-limit": _NO_DELIVERY_LIMIT}

    # The delay cascade (NServiceBus's "delay levels"): level n is a topic exchange and a queue
    # whose messages live 2^n ms, then dead-letter to level n-1 (level 0 to `delayed_exchange`).
    # A routing key starts with the delay's 32 bits, most significant first, one word each. Each
    # level exchange sends a message whose bit n is 1 into its queue, else straight on to the next
    # level. Every queue holds one TTL only, so its messages expire in arrival order and a long
    # delay never holds back a short one.

    def delay_level(self, level: int) -> str:
        """The name of delay level `level`'s exchange and of its queue.

        With `queue_type=quorum` the levels are quorum queues dead-lettering at least once, named
        `delay.v2.NN`: the classic `delay.NN` levels of earlier versions cannot be declared again
        with other arguments (RabbitMQ refuses), and an exchange of the old name would route into
        both. The old cascade keeps its bindings and drains into `delayed_exchange` as before.
        """
        if self.settings.queue_type is QueueType.CLASSIC:
            return f"{self.settings.namespace}.delay.{level:02d}"
        return f"{self.settings.namespace}.delay.v2.{level:02d}"

    def delay_level_target(self, level: int) -> str:
        return self.delay_level(level - 1) if level else self.delayed_exchange

    def delay_queue_arguments(self, level: int) -> dict[str, Any]:
        if self.settings.queue_type is QueueType.CLASSIC:
            # A classic queue dead-letters at most once: a message that the next hop cannot take
            # at that instant (a full target, a crash) is lost. The price of `queue_type=classic`.
            return {
                "x-queue-type": "classic",
                "x-message-ttl": 2**level,
                "x-dead-letter-exchange": self.delay_level_target(level),
            }
        # Quorum queues dead-letter at least once (RabbitMQ 3.10+): the broker keeps an expired
        # message until the next hop has confirmed it, and retries when a target refuses it or
        # nothing routes it. That strategy requires reject-publish overflow (with no length
        # limit set, nothing is ever refused here). 32 Raft groups per namespace cost file
        # handles: docs/rabbitmq.md says how many the broker needs.
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": 2**level,
            "x-dead-letter-exchange": self.delay_level_target(level),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    @staticmethod
    def delay_level_bindings(level: int) -> tuple[str, str]:
        """The binding keys at level `level`: (into its queue, on to the next level)."""
        skip = "*." * (DELAY_LEVELS - 1 - level)
        return f"{skip}1.#", f"{skip}0.#"

    def delayed_route(self, delay_ms: int, kind: DelayKind, destination: str) -> tuple[str, str]:
        """(exchange, routing key) that deliver to `destination` after `delay_ms` (≥ 1)."""
        if not 0 < delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"a delay of {delay_ms} ms is outside 1..{MAX_DELAY_MS} ms")
        bits = ".".join(str(delay_ms >> (DELAY_LEVELS - 1 - i) & 1) for i in range(DELAY_LEVELS))
        first_level = delay_ms.bit_length() - 1  # higher levels would only pass it on
        return self.delay_level(first_level), f"{bits}.{kind}.{_destination_words(destination)}"

    @staticmethod
    def delayed_binding(kind: DelayKind, destination: str) -> str:
        """The key binding a queue to `delayed_exchange` for `destination` when it is due."""
        return "*." * DELAY_LEVELS + f"{kind}.{_destination_words(destination)}"


def _destination_words(destination: str) -> str:
    # Names too long for a routing key travel as a digest; both ends compute the same one.
    if len(destination.encode()) <= _MAX_DESTINATION:
        return destination
    return "h-" + hashlib.sha256(destination.encode()).hexdigest()


# -- what a service declares, as data (`tidings topology`; `declarations` does the declaring) -----


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str  #: "topic" or "direct"


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Binding:
    source: str
    destination: str
    key: str
    #: "queue", or "exchange" for the delay cascade's exchange-to-exchange bindings.
    destination_type: str = "queue"


@dataclass(frozen=True, slots=True)
class Described:
    """Exchanges, queues and bindings, every one durable."""

    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def describe_topology(topology: Topology, queue: str, event_types: Iterable[str]) -> Described:
    """What opening the transport, `declare_queue(queue)` and `bind(queue, e)` for each event type
    declare: the namespace's exchanges, the queue and its error queue, and their bindings."""
    main, errors = topology.queue(queue), topology.error_queue(queue)
    bindings = [
        Binding(topology.commands_exchange, main, queue),
        Binding(topology.delayed_exchange, main, topology.delayed_binding(DelayKind.QUEUE, queue)),
        Binding(topology.errors_exchange, errors, queue),
        Binding(topology.commands_exchange, errors, error_queue_of(queue)),
    ]
    for event_type in event_types:
        bindings.append(Binding(topology.events_exchange, main, event_type))
        bindings.append(
            Binding(topology.delayed_exchange, main, topology.delayed_binding(DelayKind.EVENT, event_type))
        )
    return Described(
        exchanges=(
            Exchange(topology.events_exchange, "topic"),
            Exchange(topology.commands_exchange, "direct"),
            Exchange(topology.errors_exchange, "direct"),
            Exchange(topology.delayed_exchange, "topic"),
        ),
        queues=(
            Queue(main, topology.queue_arguments(queue, temporary=False)),
            Queue(errors, topology.error_queue_arguments(temporary=False)),
        ),
        bindings=tuple(bindings),
    )


def describe_delay_cascade(topology: Topology) -> Described:
    """The delay cascade, which the transport declares at the first delayed message."""
    levels = [topology.delay_level(level) for level in range(DELAY_LEVELS)]
    bindings: list[Binding] = []
    for level, name in enumerate(levels):
        into_queue, onward = topology.delay_level_bindings(level)
        bindings.append(Binding(name, name, into_queue))
        bindings.append(Binding(name, topology.delay_level_target(level), onward, "exchange"))
    return Described(
        exchanges=tuple(Exchange(name, "topic") for name in levels),
        queues=tuple(Queue(name, topology.delay_queue_arguments(level)) for level, name in enumerate(levels)),
        bindings=tuple(bindings),
    )
