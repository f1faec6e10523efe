"""A producer process of a verification run: sends `Apply` commands and records each in the ledger.

    python -m tidings.verify.producer RUN --transport URL --database URL --index I --count N
        [--mode plain|outbox|both] [--rate R] [--in-flight K] [--negative-control unconfirmed]

- *plain*: the message is recorded in `sent` (committed), sent with the broker's confirm, and
  marked confirmed once `send` returned. A send that fails (`TransportError`: the connection went,
  no confirm in time) is sent again, with the same id, until it is confirmed.
- *outbox*: the business row, the `sent` record and the outbox row commit in one transaction; the
  relay of this process ships the row. A commit whose answer was lost with the connection is tried
  again; finding its record there means it had committed.
- *both* alternates, message by message.

`--rate` paces this producer to R messages a second (0: as fast as it goes), so that faults land
in the middle of the stream; `--in-flight` is how many sends wait for their confirms at once.
`--commit-delay S` holds each outbox transaction open a random moment up to S seconds before its
commit, so that the transactions of several producers commit out of the order of their ids;
`--no-relay` leaves the outbox to another relay (the producer then exits once its rows are
written).

The negative control `unconfirmed` counts a plain send as confirmed *before* it leaves and never
sends it again: what a cut connection or a broker restart drops is then lost, and the checker
says so. The process prints `ready` once connected and exits 0 once its messages are sent and the
outbox of the run is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from tidings.bus import Bus
from tidings.envelope import Envelope
from tidings.errors import TransportError
from tidings.outbox import OutboxSettings
from tidings.storage import outbox_table
from tidings.verify.databases import engine_for
from tidings.verify.ledger import OUTBOX, PLAIN, Ledger
from tidings.verify.messages import Apply, consumer_service, producer_service
from tidings.verify.retrying import retrying

__all__ = ["Producer", "main"]

UNCONFIRMED = "unconfirmed"

#: The relay of a verification run: quick polls (several producers share one service's outbox)
#: and a short lease, so that rows of a producer that died are shipped again soon.
RELAY_SETTINGS = OutboxSettings(poll_interval=0.1, claim_timeout=5.0)


class Producer:
    """Sends `count` messages of run `run` as producer `index` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = engine_for(args.database)
        self.ledger = Ledger(self.engine, args.run)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.service = producer_service(args.run)
        self.queue = consumer_service(args.run)
        self.bus = Bus(self.service, args.transport, database=self.engine, outbox_settings=RELAY_SETTINGS)
        self.unconfirmed = args.negative_control == UNCONFIRMED

    def mode_of(self, seq: int) -> str:
        if self.args.mode == "both":
            return PLAIN if seq % 2 else OUTBOX
        return str(self.args.mode)

    async def run(self) -> None:
        # Only the transport is opened: the producer consumes nothing, so it declares no queue.
        async with self.bus.transport:
            relay = self.bus.relay
            assert relay is not None
            relaying = asyncio.create_task(relay.run() if self.args.relay else asyncio.sleep(0))
            print("ready", flush=True)
            window = asyncio.Semaphore(self.args.in_flight)
            # A producer started again (it died) goes on after the last message it recorded.
            done = await retrying(self.recorded, "reading where to go on from") or 0
            started = time.monotonic()
            sending: set[asyncio.Task[None]] = set()
            for seq in range(done + 1, self.args.count + 1):
                if self.args.rate > 0:
                    await asyncio.sleep(max(0.0, started + (seq - done) / self.args.rate - time.monotonic()))
                await window.acquire()
                task = asyncio.create_task(self.one(seq))
                sending.add(task)
                task.add_done_callback(sending.discard)
                task.add_done_callback(lambda _: window.release())
            await asyncio.gather(*sending)
            # Other producers' rows too (one service, one outbox): this relay may be shipping them.
            while self.args.relay and await retrying(self.unsent, "counting unsent rows"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            relaying.cancel()
            await asyncio.gather(relaying, return_exceptions=True)
        await self.engine.dispose()

    async def one(self, seq: int) -> None:
        envelope = self.bus.sender.envelope_for(Apply(producer=self.args.index, seq=seq))
        if self.mode_of(seq) == OUTBOX:
            await retrying(lambda: self.through_outbox(envelope, seq), f"outbox message {seq}")
        else:
            await self.plain(envelope, seq)

    async def through_outbox(self, envelope: Envelope, seq: int) -> None:
        async with self.sessions() as session, session.begin():
            await self.ledger.order(session, envelope.id)
            await self.ledger.sent(
                session, envelope.id, producer=self.args.index, seq=seq, mode=OUTBOX, confirmed=True
            )
            await self.bus.sender.dispatch(envelope, queue=self.queue, session=session)
            if self.args.commit_delay > 0:
                await asyncio.sleep(random.uniform(0, self.args.commit_delay))

    async def plain(self, envelope: Envelope, seq: int) -> None:
        async def record() -> None:
            async with self.engine.begin() as connection:
                await self.ledger.sent(
                    connection, envelope.id, producer=self.args.index, seq=seq, mode=PLAIN,
                    confirmed=self.unconfirmed,
                )  # fmt: skip

        await retrying(record, f"recording message {seq}")
        while True:
            try:
                await self.bus.sender.dispatch(envelope, queue=self.queue)
                break
            except TransportError:
                if self.unconfirmed:
                    return  # the negative control: counted as confirmed already, never sent again
                await asyncio.sleep(0.2)  # at-least-once: the same message (same id) again

        async def confirm() -> None:
            async with self.engine.begin() as connection:
                await self.ledger.confirmed(connection, envelope.id)

        if not self.unconfirmed:
            await retrying(confirm, f"confirming message {seq}")

    async def recorded(self) -> int:
        columns = self.ledger.tables.sent.c
        query = select(func.coalesce(func.max(columns.seq), 0)).where(columns.producer == self.args.index)
        async with self.engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    async def unsent(self) -> int:
        columns = outbox_table.c
        query = select(func.count()).where(columns.service == self.service, columns.sent_at.is_(None))
        async with self.engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tidings.verify.producer")
    parser.add_argument("run")
    parser.add_argument("--transport", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--mode", choices=(PLAIN, OUTBOX, "both"), default="both")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--commit-delay", type=float, default=0.0)
    parser.add_argument("--no-relay", dest="relay", action="store_false")
    parser.add_argument("--negative-control", choices=(UNCONFIRMED,), default=None)
    return parser


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(Producer(parser().parse_args()).run())


if __name__ == "__main__":
    main()
