"""Every eshop bus, built at import and never started: what `tidings asyncapi` describes.

    tidings asyncapi examples.eshop.buses:gateway examples.eshop.buses:catalog \\
        examples.eshop.buses:basket examples.eshop.buses:ordering examples.eshop.buses:payment

The transport is `--transport URL` or `$TIDINGS_TRANSPORT`, as for the service processes: with
`amqp://guest:guest@127.0.0.1:5672/` the document has the RabbitMQ exchanges, queues and routing
keys. Nothing connects: making a bus opens neither its transport nor its database (an in-memory
SQLite engine here, since only the buses' declarations are read).
"""

from __future__ import annotations

import os
from decimal import Decimal

from sqlalchemy.ext.asyncio import create_async_engine

from examples.eshop import basket as _basket
from examples.eshop import catalog as _catalog
from examples.eshop import gateway as _gateway
from examples.eshop import ordering as _ordering
from examples.eshop import payment as _payment
from examples.eshop.service import Names
from tidings import Bus

__all__ = ["basket", "build_all", "catalog", "gateway", "ordering", "payment"]


def build_all(names: Names, transport: str) -> dict[str, Bus]:
    """The five buses of one eshop deployment, by service, gateway first (it only asks)."""
    # Engines that are never connected to: the buses need one to have an outbox and an inbox.
    memory = "sqlite+aiosqlite://"
    return {
        "gateway": _gateway.make_bus(names, transport),
        "catalog": _catalog.build(names, transport, create_async_engine(memory)),
        "basket": _basket.build(names, transport, create_async_engine(memory)),
        "ordering": _ordering.build(names, transport, create_async_engine(memory)),
        "payment": _payment.build(
            names, transport, create_async_engine(memory), limit=Decimal(300), flaky=frozenset()
        ),
    }


_buses = build_all(Names(), os.environ.get("TIDINGS_TRANSPORT") or "sqlite:///eshop-bus.db")
gateway = _buses["gateway"]
catalog = _buses["catalog"]
basket = _buses["basket"]
ordering = _buses["ordering"]
payment = _buses["payment"]
