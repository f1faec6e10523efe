"""Raw injection: put a message with any headers and body onto a queue, below the `Envelope`.

`transport.send(Envelope(...))` always writes complete CloudEvents attributes, so a message whose
headers are broken has to go in underneath, through each transport's own storage. This module is
the one place that knows how: memory's `_Stored` items, SQLite's message table, an AMQP publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from tidings import Transport, transport_from_url
from tidings.transports.memory import MemoryTransport, _Stored


class RawInjector(ABC):
    """Puts `headers` + `body` on `queue` exactly as given."""

    @abstractmethod
    async def put(self, queue: str, headers: Mapping[str, str], body: bytes) -> None: ...


class _Memory(RawInjector):
    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport

    async def put(self, queue: str, headers: Mapping[str, str], body: bytes) -> None:
        self.transport.broker.queue(queue).put(_Stored(dict(headers), body))


class _SQLite(RawInjector):
    def __init__(self, path: str) -> None:
        # A connection of our own: the transport's lives on its worker thread. The timeout waits
        # out the transport's write transactions; inserts run one at a time, on pool threads.
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.lock = asyncio.Lock()

    async def put(self, queue: str, headers: Mapping[str, str], body: bytes) -> None:
        row = (queue, headers.get("id", ""), json.dumps(dict(headers)), body, time.time(), queue)
        async with self.lock:
            await asyncio.to_thread(self._insert, row)

    def _insert(self, row: tuple[Any, ...]) -> None:
        inserted = self.connection.execute(
            "INSERT INTO tidings_messages (queue, message_id, headers, body, visible_at)"
            " SELECT ?, ?, ?, ?, ? FROM tidings_queues WHERE name = ?",
            row,
        )
        assert inserted.rowcount == 1, f"no queue {row[0]!r} to inject into"


class _RabbitMQ(RawInjector):
    # pika, not aio-pika: aiormq gives every message it publishes a message_id (which the AMQP
    # binding reads as the CloudEvents id), so it cannot send a message without one. pika sends
    # exactly what it is given, like any foreign publisher.
    def __init__(self, broker_url: str, queue_name: Callable[[str], str]) -> None:
        import pika

        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # basic_publish returns once the broker has it
        self.queue_name = queue_name
        self.lock = asyncio.Lock()

    async def put(self, queue: str, headers: Mapping[str, str], body: bytes) -> None:
        async with self.lock:  # a pika connection is not thread-safe: one publish at a time
            await asyncio.to_thread(self._publish, queue, headers, body)

    def _publish(self, queue: str, headers: Mapping[str, str], body: bytes) -> None:
        import pika

        from tidings.transports.rabbitmq.codec import encode_message

        # The binding's mapping (attributes as cloudEvents_* headers), none of its defaults.
        message = encode_message(headers, body)
        properties = pika.BasicProperties(
            headers=dict(message.properties.headers or {}),
            content_type=message.properties.content_type,
            message_id=message.properties.message_id,
            delivery_mode=2,
        )
        self.channel.basic_publish("", self.queue_name(queue), body, properties, mandatory=True)


@contextlib.asynccontextmanager
async def raw_injector(url: str) -> AsyncIterator[RawInjector]:
    """An injector for the system `url` names (its queues must be declared before `put`)."""
    transport: Transport = transport_from_url(url)
    if isinstance(transport, MemoryTransport):
        yield _Memory(transport)
    elif url.startswith("sqlite:"):
        injector = _SQLite(transport.settings.path)  # type: ignore[attr-defined]
        try:
            yield injector
        finally:
            injector.connection.close()
    else:
        from tidings.transports.rabbitmq.settings import RabbitMQSettings
        from tidings.transports.rabbitmq.topology import Topology

        settings = RabbitMQSettings.from_url(url)
        rabbitmq = await asyncio.to_thread(_RabbitMQ, settings.broker_url, Topology(settings).queue)
        try:
            yield rabbitmq
        finally:
            await asyncio.to_thread(rabbitmq.connection.close)
