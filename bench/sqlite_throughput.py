"""End-to-end throughput and latency of the SQLite transport: publisher and subscriber in two processes.

    .venv/bin/python bench/sqlite_throughput.py                # 20,000 events through the port
    .venv/bin/python bench/sqlite_throughput.py --via-bus      # ... and the same through Bus

For each mode it prints end-to-end messages/s (first publish to last handled, in the subscriber
process), p50/p99 latency (the publish timestamp in the body to the handler) and the subscriber's
peak RSS; next to the ceiling, the raw `sqlite3` single-row commit rate on the same file system with
the same pragmas (one INSERT + COMMIT per row), measured just before each run, and the ratio (the
median of `--repeat` runs: on a shared machine both numbers move with the load). Then, without a
backlog, the latency at a paced rate; and the CPU an idle subscriber burns while it polls for other
processes' commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from tidings import Bus, Context, Event
from tidings.envelope import Envelope
from tidings.transports.sqlite import SQLiteTransport

QUEUE = "bench-subscriber"


class BenchEvent(Event):
    t: float
    i: int


EVENT = "BenchEvent"  # BenchEvent's wire name, for the port mode


# -- the ceiling ------------------------------------------------------------------------------------


def raw_commit_rate(directory: Path, seconds: float) -> float:
    """Rows/s for one INSERT + COMMIT per row, WAL + synchronous=NORMAL (the transport's pragmas)."""
    db = sqlite3.connect(directory / f"raw-{time.time_ns()}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE rows (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    rows = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO rows (body) VALUES (?)", (json.dumps({"t": time.time(), "i": rows}).encode(),)
        )
        db.execute("COMMIT")
        rows += 1
    rate = rows / (time.perf_counter() - started)
    db.close()
    return rate


# -- the subscriber process -------------------------------------------------------------------------


class _Recorder:
    def __init__(self, count: int, warmup: int) -> None:
        self.count = count
        #: Events numbered below this are left out of the latency figures.
        self.warmup = warmup
        self.received = 0
        self.first_latency = 0.0
        self.latencies: list[float] = []
        self.last_handled = 0.0
        self.done = asyncio.Event()

    def handled(self, sent_at: float, number: int) -> None:
        now = time.time()
        if number == 0:
            self.first_latency = now - sent_at
        if number >= self.warmup:
            self.latencies.append(now - sent_at)
        self.last_handled = now
        self.received += 1
        if self.received >= self.count:
            self.done.set()

    def summary(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        return {
            "received": self.received,
            "first_ms": self.first_latency * 1000,
            "last_handled": self.last_handled,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _idle_share(seconds: float) -> float:
    """The share of one core this whole process (all threads) used over `seconds`."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (_cpu_seconds() - cpu) / (time.perf_counter() - wall)


async def subscribe_via_port(url: str, count: int, warmup: int, prefetch: int, idle: float) -> dict[str, Any]:
    recorder = _Recorder(count, warmup)
    async with SQLiteTransport.from_url(url) as transport:
        await transport.declare_queue(QUEUE)
        await transport.bind(QUEUE, EVENT)

        async def consume() -> None:
            async for delivery in transport.receive(QUEUE, prefetch=prefetch):
                body = json.loads(delivery.body)
                recorder.handled(body["t"], body["i"])
                await delivery.ack()
                if recorder.done.is_set():
                    return

        consuming = asyncio.create_task(consume())
        print("ready", flush=True)
        idle_cpu = await _idle_share(idle)
        print("go", flush=True)
        await consuming
    return {"idle_cpu": idle_cpu, **recorder.summary()}


async def subscribe_via_bus(url: str, count: int, warmup: int, prefetch: int, idle: float) -> dict[str, Any]:
    recorder = _Recorder(count, warmup)
    bus = Bus("bench-subscriber", transport=url, concurrency=prefetch, prefetch=prefetch)

    @bus.subscribe(BenchEvent)
    async def handle(event: BenchEvent, ctx: Context) -> None:
        recorder.handled(event.t, event.i)

    async with bus:
        running = asyncio.create_task(bus.run())
        print("ready", flush=True)
        idle_cpu = await _idle_share(idle)
        print("go", flush=True)
        await recorder.done.wait()
        bus.stop()
        await running
    return {"idle_cpu": idle_cpu, **recorder.summary()}


# -- the publisher (this process) -------------------------------------------------------------------


async def publish(url: str, mode: str, count: int, batch: int, publishers: int, rate: float | None) -> float:
    """Publish `count` events from `publishers` concurrent tasks, each in gathers of `batch`
    (or, with `rate`, one at a time at that pace). Returns when the first publish started."""
    connection: AbstractAsyncContextManager[Any]
    if mode == "bus":
        bus = Bus("bench-publisher", transport=url)
        connection = bus

        async def one(i: int) -> None:
            await bus.publish(BenchEvent(t=time.time(), i=i))

    else:
        transport = connection = SQLiteTransport.from_url(url)

        async def one(i: int) -> None:
            body = json.dumps({"t": time.time(), "i": i}).encode()
            await transport.publish(Envelope(type=EVENT, source="bench-publisher", body=body))

    async def producer(first: int) -> None:
        for start in range(first * batch, count, batch * publishers):
            await asyncio.gather(*(one(i) for i in range(start, min(start + batch, count))))

    async def paced(rate: float) -> None:
        started = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            await one(i)

    async with connection:
        started = time.time()
        if rate is None:
            await asyncio.gather(*(producer(k) for k in range(publishers)))
        else:
            await paced(rate)
    return started


def run(
    mode: str, args: argparse.Namespace, directory: Path, *, count: int, rate: float | None, idle: float
) -> dict[str, Any]:
    url = f"sqlite:///{directory / f'{mode}-{count}-{rate}-{time.time_ns()}.db'}"
    # At a paced rate, the first half second is left out: the subscriber, idle until then, polls
    # every max_poll_interval, so the first events queue up behind its first poll.
    warmup = 0 if rate is None else int(rate / 2)
    command = [sys.executable, __file__, "--role", f"subscriber-{mode}", "--url", url, "--count", str(count)]
    command += ["--warmup", str(warmup), "--prefetch", str(args.prefetch), "--idle", str(idle)]
    subscriber = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert subscriber.stdout is not None
    assert subscriber.stdout.readline().strip() == "ready"
    assert subscriber.stdout.readline().strip() == "go"
    started = asyncio.run(publish(url, mode, count, args.batch, args.publishers, rate))
    result: dict[str, Any] = json.loads(subscriber.stdout.readline())
    subscriber.wait()
    result["rate"] = result["received"] / (result["last_handled"] - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=250, help="publishes gathered at once")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishing tasks")
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument(
        "--repeat", type=int, default=3, help="throughput runs per mode (the median is shown)"
    )
    parser.add_argument("--paced-rate", type=float, default=1000.0, help="msgs/s of the latency run")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds the idle subscriber is measured")
    parser.add_argument("--via-bus", action="store_true", help="also measure through Bus")
    parser.add_argument("--dir", type=Path, help="where the database files go (default: a temp dir)")
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role.startswith("subscriber-"):
        subscribe = subscribe_via_bus if args.role == "subscriber-bus" else subscribe_via_port
        result = asyncio.run(subscribe(args.url, args.count, args.warmup, args.prefetch, args.idle))
        print(json.dumps(result), flush=True)
        return

    print(
        f"{args.count:,} events, {args.publishers} publishing tasks x gathers of {args.batch},"
        f" prefetch {args.prefetch}; median of {args.repeat} runs, each next to the ceiling measured"
        " just before it (raw sqlite3, one INSERT + COMMIT per row, WAL, synchronous=NORMAL)"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        directory = Path(name)
        for mode in ("port", "bus") if args.via_bus else ("port",):
            runs = []
            for _ in range(args.repeat):
                ceiling = raw_commit_rate(directory, seconds=1.0)
                flood = run(mode, args, directory, count=args.count, rate=None, idle=0.0)
                runs.append((flood["rate"] / ceiling, ceiling, flood))
            ratio, ceiling, flood = sorted(runs, key=lambda one: one[0])[len(runs) // 2]
            paced = run(
                mode, args, directory, count=int(args.paced_rate * 3), rate=args.paced_rate, idle=args.idle
            )
            print(
                f"  via {mode}: {flood['rate']:,.0f} msgs/s end-to-end, ceiling {ceiling:,.0f} rows/s:"
                f" {ratio:.0%} (all runs: {', '.join(f'{r:.0%}' for r, _, _ in runs)});"
                f" latency p50 {flood['p50_ms']:.0f} ms, p99 {flood['p99_ms']:.0f} ms;"
                f" subscriber peak RSS {flood['peak_rss_mb']:.0f} MB\n"
                f"    at {args.paced_rate:,.0f} msgs/s: latency p50 {paced['p50_ms']:.1f} ms,"
                f" p99 {paced['p99_ms']:.1f} ms (the first event, to an idle subscriber:"
                f" {paced['first_ms']:.0f} ms)\n"
                f"    idle subscriber ({args.idle:.0f} s): {paced['idle_cpu']:.2%} of a core"
            )


if __name__ == "__main__":
    main()
