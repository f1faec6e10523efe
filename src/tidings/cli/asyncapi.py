"""`tidings asyncapi package.module:bus [...]`: the AsyncAPI 3.0.0 document of these services.

`tidings.asyncapi` builds it from the buses, with no connection (docs/asyncapi.md); this module
loads the buses and prints it: JSON, or YAML with `--yaml` (PyYAML, the `asyncapi` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from tidings.asyncapi import asyncapi_document
from tidings.cli.worker import TRANSPORT_HELP, load_bus
from tidings.extras import explain_missing_extra

__all__ = ["add_command", "print_document", "to_yaml"]


def add_command(commands: Any) -> None:
    """Add `asyncapi` to the `tidings` command's subparsers."""
    parser = commands.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of one or more services (no connection made)",
        description="Print the AsyncAPI 3.0.0 document of the services whose buses are named: a "
        "channel per queue and per event type, each service's send and receive operations, the "
        "messages with their JSON Schema and headers, and on RabbitMQ the AMQP bindings. Derived "
        "from the buses' registrations, routes and declared publishes; nothing is connected to.",
    )
    parser.add_argument(
        "buses",
        nargs="+",
        metavar="BUS",
        help="a service's bus, as package.module:attribute (one per service)",
    )
    parser.add_argument("--transport", default=None, metavar="URL", help=TRANSPORT_HELP)
    parser.add_argument("--title", default=None, help="info.title (default: the services' names)")
    parser.add_argument("--api-version", default="0.1.0", help="info.version, the version of the document")
    parser.add_argument(
        "--yaml",
        action="store_true",
        help="print YAML instead of JSON (PyYAML: pip install 'tidings[asyncapi]')",
    )
    parser.set_defaults(run=_asyncapi)


def _asyncapi(args: argparse.Namespace) -> int:
    if args.yaml:
        _yaml()  # before importing the services: a missing library is said first
    buses = [load_bus(path, transport=args.transport) for path in args.buses]
    document = asyncapi_document(buses, title=args.title, version=args.api_version)
    print_document(document, sys.stdout, as_yaml=args.yaml)
    return 0


def print_document(document: dict[str, Any], out: TextIO, *, as_yaml: bool = False) -> None:
    """Write `document` to `out`: indented JSON, or YAML."""
    out.write(to_yaml(document) if as_yaml else json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def to_yaml(document: dict[str, Any]) -> str:
    """`document` as YAML, in the order of its keys (PyYAML: the `asyncapi` extra)."""
    text: str = _yaml().safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return text


def _yaml() -> Any:
    try:
        import yaml
    except ModuleNotFoundError as error:
        explain_missing_extra("asyncapi", "tidings asyncapi --yaml", error)
        raise
    return yaml
