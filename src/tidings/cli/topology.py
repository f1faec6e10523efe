"""`tidings topology package.module:bus`: what the service declares on its transport, printed.

Derived from the bus's registrations and the transport's naming, with no connection: the queues,
and on RabbitMQ the exchanges, queue arguments and bindings (`describe_topology` in
`tidings.transports.rabbitmq.topology`); on SQLite and memory the queues and the event bindings.
`--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from tidings.bus import Bus
from tidings.cli.describe import registered, transport_label
from tidings.cli.worker import TRANSPORT_HELP, load_bus
from tidings.transports import error_queue_of

if TYPE_CHECKING:
    from tidings.transports.rabbitmq.topology import Described, Topology

__all__ = ["add_command", "describe", "print_topology"]

#: How a bus names its reply queue, one per instance: `<service>.replies.<12 hex digits>`.
_REPLY_QUEUE = "{service}.replies.<12 hex digits>"


def add_command(commands: Any) -> None:
    """Add `topology` to the `tidings` command's subparsers."""
    parser = commands.add_parser(
        "topology",
        help="print the queues, exchanges and bindings a service declares (no connection made)",
        description="Print what the bus declares when it starts: its queue and error queue, the "
        "bindings of the events it subscribes to and, on RabbitMQ, the exchanges and queue "
        "arguments. Derived from the bus's registrations; nothing is connected to.",
    )
    parser.add_argument("bus", nargs="+", help="the bus(es) to describe, as package.module:attribute")
    parser.add_argument("--transport", default=None, metavar="URL", help=TRANSPORT_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--permissions",
        action="store_true",
        help="print, for each service, the `rabbitmqctl set_permissions` command granting its broker "
        "user (named after the service) what it needs and no more",
    )
    parser.set_defaults(run=_topology)


def _topology(args: argparse.Namespace) -> int:
    buses = [load_bus(path, transport=args.transport) for path in args.bus]
    if args.permissions:
        return print_permissions(buses, sys.stdout, as_json=args.json)
    for index, bus in enumerate(buses):
        if index:
            sys.stdout.write("\n")
        print_topology(bus, sys.stdout, as_json=args.json)
    return 0


def print_permissions(buses: list[Bus], out: TextIO, *, as_json: bool = False) -> int:
    """Print each RabbitMQ service's `set_permissions` command (docs/rabbitmq.md); 2 if one is not."""
    from tidings.transports.rabbitmq.permissions import service_permissions

    granted = []
    for bus in buses:
        topology = _rabbitmq_topology(bus)
        if topology is None:
            sys.stderr.write(f"tidings topology: {bus.service} is not on RabbitMQ: no broker permissions\n")
            return 2
        granted.append(service_permissions(topology, bus.queue))
    if as_json:
        out.write(json.dumps([dataclasses.asdict(p) for p in granted], indent=2) + "\n")
        return 0
    for bus, permissions in zip(buses, granted, strict=True):
        out.write(f"# {bus.service}: configure, write and read its own queues, the namespace's exchanges "
                  "and the delay cascade\n")  # fmt: skip
        out.write(permissions.command() + "\n")
    return 0


def describe(bus: Bus) -> dict[str, Any]:
    """What `bus` declares on its transport, as plain data (what `--json` prints)."""
    names = registered(bus)
    description: dict[str, Any] = {
        "service": bus.service,
        "transport": transport_label(bus.transport),
        "events": list(names.events),
        "commands": list(names.commands),
    }
    rabbitmq = _rabbitmq_topology(bus)
    if rabbitmq is not None:
        from tidings.transports.rabbitmq.topology import describe_delay_cascade, describe_topology

        declared = describe_topology(rabbitmq, bus.queue, names.events)
        description.update(
            namespace=rabbitmq.settings.namespace,
            vhost=rabbitmq.settings.vhost,
            **_as_data(declared),
            delay_cascade=_as_data(describe_delay_cascade(rabbitmq)),
            reply_queue=rabbitmq.queue(_REPLY_QUEUE.format(service=bus.service)),
        )
    else:
        description.update(
            queues=[{"name": bus.queue}, {"name": error_queue_of(bus.queue)}],
            bindings=[{"event_type": name, "queue": bus.queue} for name in names.events],
            reply_queue=_REPLY_QUEUE.format(service=bus.service),
        )
    return description


def _rabbitmq_topology(bus: Bus) -> Topology | None:
    # Imported only for a bus on RabbitMQ: the package needs aio-pika (the `rabbitmq` extra).
    if not type(bus.transport).__module__.startswith("tidings.transports.rabbitmq."):
        return None
    from tidings.transports.rabbitmq import RabbitMQTransport

    return bus.transport.topology if isinstance(bus.transport, RabbitMQTransport) else None


def _as_data(declared: Described) -> dict[str, Any]:
    return {
        "exchanges": [dataclasses.asdict(e) for e in declared.exchanges],
        "queues": [dataclasses.asdict(q) for q in declared.queues],
        "bindings": [dataclasses.asdict(b) for b in declared.bindings],
    }


def print_topology(bus: Bus, out: TextIO, *, as_json: bool = False) -> None:
    """Print what `bus` declares: text, or JSON with `as_json`."""
    description = describe(bus)
    if as_json:
        out.write(json.dumps(description, indent=2) + "\n")
        return
    lines = [f"service {bus.service} on {description['transport']}"]
    if "namespace" in description:
        lines[0] += f" (vhost {description['vhost']}, namespace {description['namespace']})"
        lines += _rabbitmq_text(description)
    else:
        lines += [
            "",
            "queues",
            *_columns([(q["name"], "") for q in description["queues"]]),
            "",
            "bindings (event type -> queue)",
            *(
                _columns([(b["event_type"], f"-> {b['queue']}") for b in description["bindings"]])
                or ["  none"]
            ),
            "",
            f"per instance: a temporary reply queue {description['reply_queue']} and its error queue",
        ]
    if description["commands"]:
        lines += ["", f"commands handled (sent to queue {bus.queue}): {', '.join(description['commands'])}"]
    out.write("\n".join(lines) + "\n")


def _rabbitmq_text(description: dict[str, Any]) -> list[str]:
    cascade = description["delay_cascade"]
    first, last = cascade["queues"][0], cascade["queues"][-1]
    queue_type = first["arguments"]["x-queue-type"]
    return [
        "",
        "exchanges (durable)",
        *_columns([(e["name"], e["type"]) for e in description["exchanges"]]),
        "",
        "queues (durable)",
        *_columns(
            [
                (q["name"], " ".join(f"{k}={v}" for k, v in q["arguments"].items()))
                for q in description["queues"]
            ]
        ),
        "",
        "bindings (source -> destination: binding key)",
        *_columns([(b["source"], f"-> {b['destination']}: {b['key']}") for b in description["bindings"]]),
        "",
        f"at the first delayed message (a delayed retry, a scheduled send): the delay cascade, "
        f"{first['name']} ... {last['name']},",
        f"  {len(cascade['exchanges'])} topic exchanges and {len(cascade['queues'])} {queue_type} queues "
        "(--json lists them with their bindings)",
        f"per instance: a temporary reply queue {description['reply_queue']} (classic, exclusive) "
        "and its error queue",
    ]


def _columns(rows: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    width = max(len(first) for first, _ in rows)
    return [f"  {first.ljust(width)}  {second}".rstrip() for first, second in rows]
