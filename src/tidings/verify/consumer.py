"""A consumer process of a verification run: applies each `Apply` once, with the inbox.

    python -m tidings.verify.consumer RUN --transport URL --database URL [--concurrency N]
        [--handler-delay SECONDS] [--negative-control no-inbox|ack-before-effect]

The handler writes the message's effect in the inbox's transaction (`ctx.session`); a middleware
outside the inbox records every delivery that reaches the handler chain, duplicates included.
`TIDINGS_CRASH_AT=verify-before-commit[:n]` kills the process after the effect is written, before
its transaction commits; `inbox-after-commit[:n]` after the commit, before the ack
(`tidings.storage.crashpoints`).

The negative controls show that the checker can fail:

- `no-inbox`: the bus has no database, the handler commits its effect in a transaction of its own
  and the delivery is acknowledged after: a crash between the two applies the effect twice;
- `ack-before-effect`: the handler returns at once (the message is acknowledged) and applies the
  effect a moment later: a crash in between loses it.

It prints `ready` once consuming and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from tidings.bus import Bus
from tidings.context import Context
from tidings.handlers import Next
from tidings.messages import Message
from tidings.storage.crashpoints import crash_point
from tidings.storage.database import translate_errors
from tidings.verify.databases import engine_for
from tidings.verify.ledger import Ledger
from tidings.verify.messages import Apply, consumer_service

__all__ = ["build", "main"]

log = logging.getLogger("tidings.verify")

NO_INBOX = "no-inbox"
ACK_BEFORE_EFFECT = "ack-before-effect"

#: Seconds the `ack-before-effect` control waits after the ack before it writes the effect.
EFFECT_DELAY = 0.2


def build(args: argparse.Namespace) -> tuple[Bus, AsyncEngine]:
    """The consumer's bus, and the engine of its ledger (see the module docstring)."""
    engine = engine_for(args.database)
    ledger = Ledger(engine, args.run)
    control = args.negative_control
    pid = os.getpid()

    async def record_delivery(ctx: Context, message: Message, call_next: Next) -> Any:
        # Outside the inbox, in a transaction of its own: every delivery, a duplicate included.
        # A database that is down is an outage (`Unavailable`): the message goes back for later.
        with translate_errors():
            async with engine.begin() as connection:
                await ledger.delivered(connection, ctx.message_id)
        return await call_next(ctx, message)

    bus = Bus(
        consumer_service(args.run),
        args.transport,
        concurrency=args.concurrency,
        database=None if control == NO_INBOX else engine,
        middleware=(record_delivery,),
    )
    pending: set[asyncio.Task[None]] = set()

    async def effect_later(message_id: str) -> None:
        await asyncio.sleep(EFFECT_DELAY)
        try:
            async with engine.begin() as connection:
                await ledger.effect(connection, message_id, pid)
        except Exception as error:  # the negative control: an effect after the ack may never happen
            log.warning("the effect of %s is lost: %s", message_id, error)

    @bus.handle(Apply)
    async def apply(command: Apply, ctx: Context) -> None:
        if args.handler_delay:
            await asyncio.sleep(args.handler_delay)
        if control == NO_INBOX:
            with translate_errors():
                async with engine.begin() as connection:
                    await ledger.effect(connection, ctx.message_id, pid)
            crash_point("inbox-after-commit")  # the inbox's window: committed, not acknowledged
        elif control == ACK_BEFORE_EFFECT:
            task = asyncio.create_task(effect_later(ctx.message_id))
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            await ledger.effect(ctx.session, ctx.message_id, pid)
            crash_point("verify-before-commit")  # written, not committed: must leave no trace

    return bus, engine


async def consume(args: argparse.Namespace) -> None:
    bus, engine = build(args)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, bus.stop)
    async with bus:
        print("ready", flush=True)
        await bus.run()
    await engine.dispose()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tidings.verify.consumer")
    parser.add_argument("run")
    parser.add_argument("--transport", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--handler-delay", type=float, default=0.0)
    parser.add_argument("--negative-control", choices=(NO_INBOX, ACK_BEFORE_EFFECT), default=None)
    return parser


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(consume(parser().parse_args()))


if __name__ == "__main__":
    main()
