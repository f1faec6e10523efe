"""One verification run: its processes, its progress, its report, and removing it afterwards.

    run = Run(RunSettings(transport=url, database=db, messages=10_000, directory=logs))
    await run.setup()                  # ledger tables, outbox/inbox tables if missing, the queue
    try:
        await run.start()              # consumers first, then producers; dead ones come back
        async with run.fault("broker restart"):
            ...                        # whatever the caller does to the system
        await run.settle(patience=30)  # until every confirmed message is handled, or no progress
        report = await run.report()
    finally:
        await run.stop()               # SIGTERM, then SIGKILL
        await run.teardown()           # queues, rows, tables of this run

The processes are `python -m tidings.verify.producer` and `python -m tidings.verify.consumer`
(their output in `RunSettings.directory`). A consumer or a producer that dies (killed, or unable to
connect while the broker is down) is started again at once; a restarted producer goes on after
the last message it recorded. `crash_at` picks a `TIDINGS_CRASH_AT` for each consumer start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from tidings.storage import create_tables, outbox_table
from tidings.transports import transport_from_url
from tidings.verify.check import Report, check
from tidings.verify.databases import engine_for
from tidings.verify.ledger import Ledger
from tidings.verify.messages import consumer_service, producer_service
from tidings.verify.teardown import drop_tables, missing_tables, remove_queues, remove_rows

__all__ = ["Progress", "Run", "RunSettings"]

Process = asyncio.subprocess.Process

#: Seconds between a process's death and its restart (a crash loop must not spin).
RESTART_DELAY = 0.2
#: Seconds a run waits for its first message before it gives up (processes take a while to
#: start on a busy machine), unless its patience is longer.
STARTUP = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """What a run sends, through what, with how many processes."""

    transport: str
    database: str
    #: Where the processes' output goes.
    directory: Path
    messages: int = 1000
    producers: int = 2
    consumers: int = 2
    #: `plain`, `outbox` or `both` (alternating).
    mode: str = "both"
    #: Messages per second of all producers together; 0: as fast as they go.
    rate: float = 0.0
    #: Sends waiting for their confirms at once, per producer.
    in_flight: int = 20
    #: Handlers at once, per consumer.
    concurrency: int = 10
    #: Seconds each handler call takes (a slow handler, so that a backlog builds up); 0: none.
    handler_delay: float = 0.0
    #: Longest random pause before each outbox commit (out-of-order commits); 0: none.
    commit_delay: float = 0.0
    #: Whether the producers relay their outbox (False: the caller ships it some other way).
    relay: bool = True
    #: Negative controls (the checker must then fail): `unconfirmed` for the producers,
    #: `no-inbox` or `ack-before-effect` for the consumers.
    producer_control: str | None = None
    consumer_control: str | None = None
    #: Extra environment of the processes.
    env: Mapping[str, str] = field(default_factory=dict)
    run: str = field(default_factory=lambda: secrets.token_hex(4))


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a run is, counted quickly while it goes."""

    sent: int
    confirmed: int
    handled: int
    unsent: int

    def describe(self) -> str:
        return (
            f"sent {self.sent}, confirmed {self.confirmed}, handled {self.handled}, "
            f"outbox backlog {self.unsent}"
        )


class Run:
    """The processes and the ledger of one verification run (see the module docstring)."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.engine = engine_for(settings.database)
        self.ledger = Ledger(self.engine, settings.run)
        self.consumer_service = consumer_service(settings.run)
        self.producer_service = producer_service(settings.run)
        self.consumers: list[Process | None] = [None] * settings.consumers
        self.producers: list[Process | None] = [None] * settings.producers
        self.finished: set[int] = set()  # producers that exited 0
        #: Starts after the first, by kind: deaths the run recovered from.
        self.restarts = {"consumer": 0, "producer": 0}
        #: SIGKILLs sent by `kill_consumer` and `kill_producer`.
        self.kills = 0
        self.crash_at: Callable[[], str | None] | None = None
        self._created_tables: list[str] = []
        self._supervising: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = 0

    # -- setting up and removing ---------------------------------------------------------------

    async def setup(self) -> None:
        """Create the ledger, the outbox and inbox tables if missing, and the consumers' queue."""
        self._created_tables = await missing_tables(self.engine)
        await create_tables(self.engine)
        await self.ledger.create()
        # Declared before any producer sends, so no message is refused for want of a queue.
        async with transport_from_url(self.settings.transport) as transport:
            await transport.declare_queue(self.consumer_service)

    async def teardown(self) -> None:
        """Remove the run's queues, its outbox and inbox rows, its tables; dispose of the engine."""
        try:
            await remove_queues(self.settings.transport, [self.consumer_service])
            await remove_rows(self.engine, [self.consumer_service, self.producer_service])
            await self.ledger.drop()
            if self._created_tables:
                await drop_tables(self.engine, self._created_tables)
        finally:
            await self.engine.dispose()

    # -- processes -------------------------------------------------------------------------------

    async def _spawn(self, module: str, *args: str, crash_at: str | None = None) -> Process:
        env = dict(os.environ)
        env.update(self.settings.env)
        env.pop("TIDINGS_CRASH_AT", None)
        if crash_at is not None:
            env["TIDINGS_CRASH_AT"] = crash_at
        self._started += 1
        self.settings.directory.mkdir(parents=True, exist_ok=True)
        role = module.rpartition(".")[2]
        # A small local file, opened once per process start: no need for a thread.
        with open(self.settings.directory / f"{self._started:04d}-{role}.log", "wb") as log:  # noqa: ASYNC230
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                self.settings.run,
                "--transport",
                self.settings.transport,
                "--database",
                self.settings.database,
                *args,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def _start_consumer(self, index: int) -> None:
        args = ["--concurrency", str(self.settings.concurrency)]
        if self.settings.handler_delay:
            args += ["--handler-delay", str(self.settings.handler_delay)]
        if self.settings.consumer_control:
            args += ["--negative-control", self.settings.consumer_control]
        crash_at = self.crash_at() if self.crash_at is not None else None
        self.consumers[index] = await self._spawn("tidings.verify.consumer", *args, crash_at=crash_at)

    async def _start_producer(self, index: int) -> None:
        settings = self.settings
        share, extra = divmod(settings.messages, settings.producers)
        args = ["--index", str(index), "--count", str(share + (index < extra)), "--mode", settings.mode]
        args += ["--rate", str(settings.rate / settings.producers), "--in-flight", str(settings.in_flight)]
        if settings.commit_delay:
            args += ["--commit-delay", str(settings.commit_delay)]
        if not settings.relay:
            args.append("--no-relay")
        if settings.producer_control:
            args += ["--negative-control", settings.producer_control]
        self.producers[index] = await self._spawn("tidings.verify.producer", *args)

    async def start(self) -> None:
        """Start the consumers, then the producers, and keep them up until `stop`."""
        for index in range(self.settings.consumers):
            await self._start_consumer(index)
        for index in range(self.settings.producers):
            await self._start_producer(index)
        self._supervising = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            for index, process in enumerate(self.consumers):
                if process is not None and process.returncode is not None and not self._stopping:
                    self.restarts["consumer"] += 1
                    await self._start_consumer(index)
            for index, process in enumerate(self.producers):
                if process is None or process.returncode is None or index in self.finished:
                    continue
                if process.returncode == 0:
                    self.finished.add(index)
                elif not self._stopping:
                    self.restarts["producer"] += 1
                    await self._start_producer(index)

    @property
    def producers_done(self) -> bool:
        return len(self.finished) == self.settings.producers

    def kill_consumer(self, index: int | None = None) -> bool:
        """SIGKILL a consumer (a random live one by default); it is started again. False: none live."""
        return self._kill(self.consumers, index)

    def kill_producer(self, index: int | None = None) -> bool:
        """SIGKILL a producer (a random live one by default); it is started again and goes on."""
        return self._kill(self.producers, index)

    def _kill(self, processes: list[Process | None], index: int | None) -> bool:
        live = [i for i, p in enumerate(processes) if p is not None and p.returncode is None]
        if index is None:
            if not live:
                return False
            index = random.choice(live)
        process = processes[index]
        if process is None or process.returncode is not None:
            return False
        process.send_signal(signal.SIGKILL)
        self.kills += 1
        return True

    def pids(self, kind: str) -> list[int]:
        """The live `producer` or `consumer` processes' ids."""
        processes = self.producers if kind == "producer" else self.consumers
        return [p.pid for p in processes if p is not None and p.returncode is None]

    async def stop(self) -> None:
        """SIGTERM every process (the consumers settle what they hold), SIGKILL what has not ended in 15 s."""
        self._stopping = True
        if self._supervising is not None:
            self._supervising.cancel()
            await asyncio.gather(self._supervising, return_exceptions=True)
        processes = [p for p in (*self.producers, *self.consumers) if p is not None]
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()

    # -- faults, progress and the report -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def fault(self, name: str) -> AsyncIterator[None]:
        """Record the block as a fault in the ledger (for its time to recover)."""
        started = time.time()
        try:
            yield
        finally:
            await self.ledger.fault(name, started, time.time())

    async def progress(self) -> Progress:
        t = self.ledger.tables
        sent, outbox = t.sent.c, outbox_table.c
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    select(
                        select(func.count()).select_from(t.sent).scalar_subquery(),
                        select(func.count()).where(sent.confirmed_at.is_not(None)).scalar_subquery(),
                        select(func.count(t.effects.c.message_id.distinct())).scalar_subquery(),
                        select(func.count())
                        .where(outbox.service == self.producer_service, outbox.sent_at.is_(None))
                        .scalar_subquery(),
                    )
                )
            ).one()
        return Progress(*(int(value) for value in row))

    async def settle(
        self, *, patience: float = 30.0, every: float = 0.5, show: Callable[[Progress], None] | None = None
    ) -> bool:
        """Wait until the producers are done and every confirmed message is handled (True), or
        until nothing moved for `patience` seconds (False; before the first message, `STARTUP`)."""
        loop = asyncio.get_running_loop()
        last: Progress | None = None
        moved = loop.time()
        while True:
            try:
                now = await self.progress()
            except Exception:  # the database may be down for a moment (a fault, or the user)
                await asyncio.sleep(every)
                continue
            if show is not None:
                show(now)
            if self.producers_done and now.unsent == 0 and now.handled >= now.confirmed:
                return True
            if now != last:
                last, moved = now, loop.time()
            elif loop.time() - moved > (patience if now.sent else max(patience, STARTUP)):
                return False
            await asyncio.sleep(every)

    async def report(self) -> Report:
        """The checker's report; the error queue is read for the dead-lettered messages."""
        async with transport_from_url(self.settings.transport) as transport:
            dead = {
                letter.message_id
                for letter in await transport.dead_letters(self.consumer_service, limit=10_000)
            }
        return await check(self.ledger, service=self.producer_service, dead_lettered=dead)
