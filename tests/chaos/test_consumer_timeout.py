"""RabbitMQ's `consumer_timeout` shorter than a slow handler: the effect still happens once.

On a private node with `consumer_timeout = 5000` (ms), every handler call takes 8 s: the broker
closes the consumer's channel with the delivery unacknowledged and hands the message out again.
The consumer must notice (its channel is gone), subscribe again, and the inbox must make the
redelivered copy a duplicate. The negative control consumes without the inbox: each timed-out
delivery's effect happens again.

tidings has no handler timeout of its own to compare with the broker's; instead the consumer warns
when the broker's `consumer_timeout` took deliveries back (the last test).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import POSTGRES, full_only
from tests.chaos.ledger import finish, ledger_run
from tests.chaos.private_node import PrivateNode
from tests.conftest import POSTGRES_HOST, require_server, unique
from tests.helpers import eventually, running
from tidings import Bus, Command, Context
from tidings.verify import Report

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900), full_only]

CONSUMER_TIMEOUT_MS = 5000
HANDLER_SECONDS = 8.0


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    # The channel checks its consumers' timeouts at each tick: every minute by default.
    with PrivateNode.started(
        f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n", "{channel_tick_interval, 1000}"
    ) as node:
        yield node


async def slow_stream(tmp_path: Path, node: PrivateNode, **settings: object) -> Report:
    require_server("PostgreSQL", POSTGRES_HOST)
    async with ledger_run(
        tmp_path, transport=node.url(namespace=unique("timeout")), database=POSTGRES, messages=20,
        producers=1, consumers=1, concurrency=5, handler_delay=HANDLER_SECONDS, **settings,
    ) as run:  # fmt: skip
        return await finish(run, patience=120, what="consumer_timeout")


async def test_a_handler_slower_than_the_consumer_timeout_applies_its_effect_once(
    tmp_path: Path, node: PrivateNode
) -> None:
    report = await slow_stream(tmp_path, node)
    assert report.duplicate_deliveries > 0  # the broker did take the deliveries back
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.dead_lettered == 0
    assert report.handled == report.confirmed == report.sent


async def test_negative_control_without_the_inbox_a_timed_out_delivery_is_applied_twice(
    tmp_path: Path, node: PrivateNode
) -> None:
    report = await slow_stream(tmp_path, node, consumer_control="no-inbox")
    assert report.duplicate_effects > 0


class Slow(Command, name="consumer-timeout.slow"):
    n: int


async def test_tidings_warns_when_a_handler_outlasts_the_brokers_consumer_timeout(
    node: PrivateNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bus = Bus("slowpoke", node.url(namespace=unique("warn")))
    calls: list[int] = []

    @bus.handle(Slow)
    async def slow(command: Slow, ctx: Context) -> None:
        calls.append(command.n)
        if len(calls) == 1:
            await asyncio.sleep(HANDLER_SECONDS)  # past the broker's 5 s

    async with running(bus):
        await bus.send(Slow(n=1), to="slowpoke")
        await eventually(lambda: len(calls) == 2, timeout=60)  # taken back, delivered again
    (warning,) = [r for r in caplog.records if "consumer_timeout" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.name == "tidings.transports.rabbitmq"
    assert "a handler ran longer than the broker's consumer_timeout (5 s)" in warning.getMessage()
