"""The SQLite transport under trouble: another process holding the write lock past `busy_timeout`
(during a claim, during a settle), delayed retries of a message sent by another bus, and an
instance whose renewals stalled past its lease (its reply queue deleted as an orphan).

Everything here is real: SQLite files, a second connection holding `BEGIN IMMEDIATE`, the
transport's own connection thread; waits are bounded (`eventually`), bounds generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running
from tidings import Bus, Command, Context, Reply, RetryPolicy
from tidings.transports.sqlite import SQLiteTransport


class Job(Command):
    n: int


class Ask(Command):
    question: str


class Answer(Reply):
    text: str


@contextlib.contextmanager
def connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection of the test's own (another "process" as far as SQLite knows)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        yield db
    finally:
        db.close()


def rows_in(path: Path, queue: str) -> int:
    with connection(path) as db:
        (count,) = db.execute("SELECT count(*) FROM tidings_messages WHERE queue = ?", (queue,)).fetchone()
    return int(count)


def worker_handling_jobs(url: str, **options: Any) -> tuple[Bus, list[int]]:
    """A bus "worker" whose handler notes the number of each `Job` it handles."""
    worker = Bus("worker", url, **options)
    handled: list[int] = []

    @worker.handle(Job)
    async def job(command: Job, ctx: Context) -> None:
        handled.append(command.n)

    return worker, handled


async def test_a_write_lock_held_past_busy_timeout_during_a_claim_does_not_end_run(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?busy_timeout=0.2"
    worker, handled = worker_handling_jobs(url)
    producer = Bus("producer", url)
    producer.route(Job, to="worker")

    await worker.start()
    runner = asyncio.create_task(worker.run())
    try:
        async with producer:
            # Due in 0.3 s: the worker's claim comes while the lock below is held.
            await producer.send(Job(n=1), delay=timedelta(seconds=0.3))
            with connection(path) as holder:
                holder.execute("BEGIN IMMEDIATE")
                await asyncio.sleep(1.5)  # seven busy timeouts
                assert not runner.done(), runner.exception()
                holder.rollback()
            await eventually(lambda: handled == [1] or runner.done(), timeout=10)
            assert not runner.done(), runner.exception()
            assert handled == [1]
            # And it keeps consuming.
            await producer.send(Job(n=2))
            await eventually(lambda: handled == [1, 2] or runner.done(), timeout=10)
            assert handled == [1, 2]
    finally:
        worker.stop()
        await asyncio.gather(runner, return_exceptions=True)
        await worker.close()


async def test_run_started_while_another_process_holds_the_write_lock_waits_for_it(tmp_path: Path) -> None:
    # run() starts its consumer and its heartbeat together: the consumer's first read (does the
    # queue exist?) goes in one transaction with the heartbeat's publish, which needs the lock.
    # That read failing ended run() (the CI failure of the test above, when its consumer started
    # late); it waits for the lock like the claims after it.
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?busy_timeout=0.2"
    worker, handled = worker_handling_jobs(url, heartbeat_interval=0.1)
    worker.route(Job, to="worker")

    await worker.start()
    await worker.send(Job(n=1))
    runner: asyncio.Task[None] | None = None
    try:
        with connection(path) as holder:
            holder.execute("BEGIN IMMEDIATE")
            runner = asyncio.create_task(worker.run())
            await asyncio.sleep(1.0)  # five busy timeouts
            assert not runner.done(), runner.exception()
            holder.rollback()
        await eventually(lambda: handled == [1] or runner.done(), timeout=10)
        assert not runner.done(), runner.exception()
        assert handled == [1]
    finally:
        worker.stop()
        if runner is not None:
            await asyncio.gather(runner, return_exceptions=True)
        await worker.close()


async def test_an_ack_that_meets_a_held_write_lock_does_not_leave_the_message_claimed(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?busy_timeout=0.2&visibility_timeout=1"
    worker = Bus("worker", url)
    worker.route(Job, to="worker")
    calls: list[int] = []
    holder = sqlite3.connect(path, isolation_level=None, timeout=10)

    @worker.handle(Job)
    async def job(command: Job, ctx: Context) -> None:
        calls.append(command.n)
        if len(calls) == 1:
            # The ack that follows meets the lock; it is given back 1 s later (five busy timeouts).
            holder.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(1.0, holder.rollback)

    try:
        async with running(worker):
            await worker.send(Job(n=1))
            # Acked once the lock is free (not redelivered), or given up and redelivered within
            # the visibility timeout and acked then: either way the row goes, never stuck claimed.
            await eventually(lambda: calls != [] and rows_in(path, "worker") == 0, timeout=6)
            assert calls in ([1], [1, 1])
    finally:
        holder.close()


_PRODUCER = """
import asyncio, sys
from tidings import Bus, Command

class Job(Command):
    n: int

async def main(url):
    producer = Bus("producer", url)
    producer.route(Job, to="worker")
    async with producer:
        await producer.send(Job(n=7))
        print("sent", flush=True)
        await asyncio.sleep(3600)  # stays alive, renewing its own lease, like a web app

asyncio.run(main(sys.argv[1]))
"""


async def test_delayed_retries_of_a_message_from_another_process_keep_their_delays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative path, as in the documented `sqlite:///shop.db`.
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///bus.db"
    worker = Bus("worker", url, retry=RetryPolicy(immediate=0, delays=(1.0, 1.0, 1.0), jitter=0.0))
    calls: list[float] = []

    @worker.handle(Job)
    async def job(command: Job, ctx: Context) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("not yet")

    script = tmp_path / "producer.py"
    script.write_text(textwrap.dedent(_PRODUCER))
    async with running(worker):
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, stdout=asyncio.subprocess.PIPE, cwd=tmp_path
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(15):
                assert (await process.stdout.readline()).strip() == b"sent"
            # Four calls one second apart take three seconds; 15 s is far beyond any delay.
            await eventually(lambda: len(calls) >= 4, timeout=15)
        finally:
            process.kill()
            await process.communicate()
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert all(0.9 <= gap <= 2.5 for gap in gaps), gaps


_REQUESTER = """
import asyncio, sys
from tidings import Bus, Command, Reply

class Ask(Command):
    question: str

class Answer(Reply):
    text: str

async def main(url):
    requester = Bus("requester", url)
    requester.route(Ask, to="responder")
    loop = asyncio.get_running_loop()
    async with requester:
        print("ready", requester.reply_queue, flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                answer = await requester.request(Ask(question=line.strip()), expect=Answer, timeout=4)
                print(answer.text, flush=True)
            except Exception as error:
                print(type(error).__name__, flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_an_instance_whose_renewals_stalled_past_its_lease_still_gets_replies(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?visibility_timeout=0.6"
    responder = Bus("responder", url)

    @responder.handle(Ask)
    async def ask(command: Ask, ctx: Context) -> Answer:
        return Answer(text=command.question.upper())

    script = tmp_path / "requester.py"
    script.write_text(textwrap.dedent(_REQUESTER))
    async with running(responder):
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None

        async def ask_child(question: str) -> str:
            assert process.stdin is not None
            assert process.stdout is not None
            process.stdin.write(question.encode() + b"\n")
            await process.stdin.drain()
            async with asyncio.timeout(15):
                return (await process.stdout.readline()).decode().strip()

        try:
            async with asyncio.timeout(15):
                ready, reply_queue = (await process.stdout.readline()).decode().split()
            assert ready == "ready"
            assert await ask_child("one") == "ONE"
            # The requester's process stops (SIGSTOP: a stall of the whole process, its
            # renewals included) past its lease; not while it holds the write lock, though.
            while True:
                process.send_signal(signal.SIGSTOP)
                with connection(path) as db:
                    db.execute("PRAGMA busy_timeout = 50")
                    try:
                        db.execute("BEGIN IMMEDIATE")
                        db.rollback()
                        break
                    except sqlite3.OperationalError:
                        process.send_signal(signal.SIGCONT)
                        await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)
            async with SQLiteTransport.from_url(url):  # opening deletes "dead" instances' queues
                pass
            with connection(path) as db:
                found = db.execute("SELECT 1 FROM tidings_queues WHERE name = ?", (reply_queue,)).fetchone()
            assert found is None  # the stall did cost the queue
            process.send_signal(signal.SIGCONT)
            assert await ask_child("two") == "TWO"
        finally:
            process.kill()
            await process.communicate()
