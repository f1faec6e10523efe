"""A small service run as a real OS process by the conformance tests.

    python -m tests.conformance.app URL SERVICE OUT [--hang]

It subscribes to `PriceChanged` and handles `PlaceOrder`, appending one line per handled message
to OUT (`service pid kind seq`). With `--hang` its handler writes `started` and then never ends,
so the test can kill -9 it mid-handler. It prints `ready` once its queue is declared.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from tests.conformance.test_semantics import PlaceOrder, PriceChanged
from tidings import Bus, Context
from tidings.cli.worker import run_worker


def _record(out: str, line: str) -> None:
    # One write of one line with O_APPEND: lines from several processes never interleave.
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def build(url: str, service: str, out: str, *, hang: bool) -> Bus:
    bus = Bus(service, url, concurrency=4)

    @bus.subscribe(PriceChanged)
    async def on_price(event: PriceChanged, ctx: Context) -> None:
        _record(out, f"{service} {os.getpid()} event {event.seq}")

    @bus.handle(PlaceOrder)
    async def place(command: PlaceOrder, ctx: Context) -> None:
        if hang:
            _record(out, f"{service} {os.getpid()} started {command.order_id}")
            await asyncio.Event().wait()
        _record(out, f"{service} {os.getpid()} command {command.order_id}")

    return bus


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("service")
    parser.add_argument("out")
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    bus = build(args.url, args.service, args.out, hang=args.hang)
    await bus.start()
    print("ready", flush=True)
    await run_worker(bus)


if __name__ == "__main__":
    asyncio.run(main())
