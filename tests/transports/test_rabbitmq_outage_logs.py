"""A broker outage in the logs: one WARNING when it starts, one INFO with its duration when it ends.

A bus consumes and ships its outbox through `tests.tcp_proxy.TcpProxy`, which cuts the link and
refuses connections for a few seconds: aio-pika retries every reconnect interval meanwhile and
logs each attempt, which tidings lowers to DEBUG; tidings itself says it once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tests.helpers import eventually, running
from tests.tcp_proxy import TcpProxy
from tests.transports import test_rabbitmq as common
from tests.transports.test_rabbitmq import BROKER
from tidings import Bus, Context, Event

vhost = common.vhost
make_url = common.make_url

OUTAGE = 3.0


class Tick(Event, name="outage-logs.tick"):
    n: int


def tidings_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("tidings") and r.levelno >= level]


async def test_an_outage_is_one_warning_then_one_info_with_its_duration(
    make_url: Callable[..., str], tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/app.db")
    handled: set[int] = set()
    async with TcpProxy(BROKER) as proxy:
        # publish_timeout=1: the outage outlasts it, so the relay's publishes fail meanwhile too.
        url = proxy.rewrite(make_url(reconnect_interval="0.2", publish_timeout="1"))
        bus = Bus("outages", url, database=engine)

        @bus.subscribe(Tick)
        async def on_tick(event: Tick, ctx: Context) -> None:
            handled.add(event.n)

        await bus.create_tables()

        async def publish(n: int) -> None:
            async with AsyncSession(engine) as session, session.begin():
                await bus.publish(Tick(n=n), session=session)

        async with running(bus):
            for n in range(5):
                await publish(n)
            await eventually(lambda: len(handled) == 5)
            before = len(caplog.records)

            proxy.refusing = True
            proxy.cut()
            for n in range(5, 10):  # written during the outage: the relay ships them after it
                await publish(n)
            await asyncio.sleep(OUTAGE)
            proxy.refusing = False
            await eventually(lambda: len(handled) == 10, timeout=30)
            during = caplog.records[before:]
        await engine.dispose()

    loud = [r for r in during if r.name.startswith("tidings") and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in loud] == [
        f"RabbitMQ at {bus.sender.transport.url} is unavailable: {loud[0].getMessage().split(': ', 1)[1]}"
    ]
    assert loud[0].__dict__["outage"] == "started"
    ended = [r for r in during if r.__dict__.get("outage") == "ended"]
    assert len(ended) == 1
    assert ended[0].levelno == logging.INFO
    assert "is available again after" in ended[0].getMessage()
    assert OUTAGE - 0.5 <= ended[0].__dict__["outage_seconds"] < OUTAGE + 20
    # The client library's reconnection warnings and tracebacks are DEBUG, so not shown at INFO.
    assert [r for r in during if r.name.startswith(("aio_pika", "aiormq"))] == []
