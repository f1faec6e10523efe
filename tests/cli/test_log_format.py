"""`tidings run --log-format json`: one JSON object a line, each about its message where it has one.

The worker runs as a real process (tests/cli/shop.py); a checkout for mallory fails and, with no
retries, goes to the error queue: the lines of that message carry its id, type, correlation id and
service, the user's own line from inside the handler too, and the dead letter names its reason.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.cli.shop import Checkout
from tests.cli.test_run import line_with, shop, start_worker, stop
from tidings import Bus

__all__ = ["shop"]  # the fixture, used by name


async def lines_until(process: asyncio.subprocess.Process, text: str) -> list[str]:
    """The lines of the process's stderr up to the first that contains `text`, that one included."""
    assert process.stderr is not None
    read: list[str] = []
    async with asyncio.timeout(30):
        while line := (await process.stderr.readline()).decode():
            read.append(line)
            if text in line:
                return read
    raise AssertionError(f"the process ended without logging {text!r}: {read}")


async def test_json_lines_carry_the_message_fields(shop: Path) -> None:
    out = shop / "out.txt"
    worker = await start_worker(shop, "run", "shop.basket:bus", "--log-format", "json", APP_OUT=str(out))
    try:
        started = json.loads(await line_with(worker, "worker basket started"))
        async with Bus("till", f"sqlite:///{shop / 'tidings.db'}") as till:
            till.route(Checkout, to="basket")
            await till.send(Checkout(buyer="mallory"))
            until_dead = await lines_until(worker, "dead-lettering")
    finally:
        code, rest = await stop(worker)
    assert code == 0
    assert started["level"] == "INFO"
    assert started["logger"] == "tidings.worker"
    # Every line is one JSON object.
    lines = [json.loads(line) for line in [*until_dead, *rest.splitlines()]]
    about = [line for line in lines if "message_id" in line]
    assert {line["logger"] for line in about} >= {"shop", "tidings.pipeline"}
    assert len({line["message_id"] for line in about}) == 1
    for line in about:
        assert line["type"] == "shop.checkout"
        assert line["service"] == "basket"
        assert line["correlation_id"] == line["message_id"]  # a conversation it started
    (dead,) = [line for line in about if "dead-lettering" in line["message"]]
    assert dead["level"] == "WARNING"
    assert dead["reason"] == "handler-failed"  # RetryPolicy.none(): no retry, then the error queue
    assert dead["message"] == (
        f"basket: dead-lettering shop.checkout {dead['message_id']} from queue basket: "
        "handler-failed (ValueError('no basket for mallory'))"
    )
    user = next(line for line in about if line["logger"] == "shop")
    assert user["message"] == "checking out mallory"
