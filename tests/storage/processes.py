"""Real OS processes for the crash tests: start them, kill them with SIGKILL, wait for the database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.storage.databases import effects, engine_for, produced
from tidings.storage import outbox_table
from tidings.transports import transport_from_url

ROOT = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL

Process = asyncio.subprocess.Process


class Cluster:
    """The processes of one crash test, sharing a database, a transport and a deliveries log."""

    def __init__(self, directory: Path, database_url: str, transport_url: str) -> None:
        self.directory = directory
        self.database_url = database_url
        self.transport_url = transport_url
        self.deliveries = directory / "deliveries.log"
        self.engine: AsyncEngine = engine_for(database_url)
        self.processes: list[asyncio.subprocess.Process] = []
        self._started = 0

    async def declare_queues(self, *queues: str) -> None:
        """Declare the queues first, so no message is refused for lack of a queue."""
        async with transport_from_url(self.transport_url) as transport:
            for queue in queues:
                await transport.declare_queue(queue)

    async def start(
        self, *args: str, crash_at: str | None = None, stdin: bool = False, stdout: bool = False
    ) -> Process:
        """Start `python -m <args>` in the repository root; its output goes to a log file."""
        env = dict(os.environ)
        env.update(
            TEST_DATABASE=self.database_url,
            TIDINGS_TRANSPORT=self.transport_url,
            TEST_DELIVERIES=str(self.deliveries),
            TEST_CLAIM_TIMEOUT="1",
        )
        env.pop("TIDINGS_CRASH_AT", None)
        if crash_at is not None:
            env["TIDINGS_CRASH_AT"] = crash_at
        self._started += 1
        log = open(self.directory / f"process-{self._started}-{args[-1]}.log", "wb")  # noqa: SIM115
        with log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *args,
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout else log,
                stderr=log,
            )
        self.processes.append(process)
        return process

    async def relay(self, crash_at: str | None = None) -> Process:
        return await self.start("tidings.cli", "relay", "tests.storage.app:bank", crash_at=crash_at)

    async def consumer(self, crash_at: str | None = None) -> Process:
        return await self.start("tidings.cli", "run", "tests.storage.app:ledger", crash_at=crash_at)

    async def produce(self, count: int, *options: str, crash_at: str | None = None) -> Process:
        return await self.start("tests.storage.app", "produce", str(count), *options, crash_at=crash_at)

    async def stop(self) -> None:
        """SIGTERM what still runs (the workers stop cleanly), SIGKILL what does not stop."""
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        await self.engine.dispose()

    # -- what the database says -----------------------------------------------------------------

    async def scalar(self, query: object) -> int:
        async with self.engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())  # type: ignore[call-overload]

    async def produced_count(self) -> int:
        return await self.scalar(select(func.count()).select_from(produced))

    async def unsent(self) -> int:
        return await self.scalar(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.sent_at.is_(None))
        )

    async def distinct_effects(self) -> int:
        return await self.scalar(select(func.count(effects.c.seq.distinct())))

    async def effects_by_seq(self) -> Counter[int]:
        async with self.engine.connect() as connection:
            return Counter((await connection.execute(select(effects.c.seq))).scalars())

    async def ledger(self) -> tuple[list[int], list[int]]:
        """(lost, twice): produced seqs with no effect, and seqs whose effect happened more than once."""
        async with self.engine.connect() as connection:
            committed = set((await connection.execute(select(produced.c.seq))).scalars())
        done = await self.effects_by_seq()
        return sorted(committed - done.keys()), sorted(seq for seq, n in done.items() if n > 1)

    def delivery_log(self) -> Counter[str]:
        """How many times each message id reached the ledger's handler chain and finished."""
        if not self.deliveries.exists():
            return Counter()
        lines = self.deliveries.read_text().split()
        return Counter(lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "done")


async def until(condition: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, what: str = "") -> None:
    """Wait until the (async) condition holds; fail after `timeout` seconds (a hang, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def exited(process: asyncio.subprocess.Process, *, timeout: float = 30.0) -> int:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(process.wait(), timeout)
    process.kill()
    raise AssertionError(f"process {process.pid} did not exit within {timeout} s")
