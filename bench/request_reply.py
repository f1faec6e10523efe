"""Request/reply round trips through `Bus.request`: the requester and the responder in two processes.

    .venv/bin/python bench/request_reply.py                          # sqlite, and RabbitMQ if it answers
    .venv/bin/python bench/request_reply.py --transport memory --requests 20000

For each transport and each concurrency (requests in flight at once) it prints round trips per
second (first request sent to last reply received) and the p50/p99 latency of one round trip
(`request()` called to `request()` returned): the command to the responder's queue, its handler,
the reply to the requester's reply queue. The responder runs in a process of its own (`memory://`
lives in one process, so there both run in this one).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tidings import Bus, Command, Context, Reply
from tidings.cli.worker import run_worker

RESPONDER = "bench-responder"


class Ping(Command, name="bench.ping"):
    i: int


class Pong(Reply, name="bench.pong"):
    i: int


def responder(url: str, concurrency: int) -> Bus:
    bus = Bus(RESPONDER, url, concurrency=concurrency)

    @bus.handle(Ping)
    async def pong(ping: Ping, ctx: Context) -> Pong:
        return Pong(i=ping.i)

    return bus


async def serve(url: str, concurrency: int) -> None:
    """The responder process: answer until SIGTERM."""
    bus = responder(url, concurrency)
    await bus.start()
    print("ready", flush=True)
    await run_worker(bus)


async def ask(url: str, count: int, concurrency: int, warmup: int) -> dict[str, Any]:
    """Make `count` requests, `concurrency` in flight at once; the round-trip figures."""
    bus = Bus("bench-requester", url)
    bus.route(Ping, to=RESPONDER)
    latencies: list[float] = []
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            started = time.perf_counter()
            pong = await bus.request(Ping(i=i), expect=Pong, timeout=60)
            latencies.append(time.perf_counter() - started)
            assert pong.i == i, (pong.i, i)

    async with bus:
        for i in range(warmup):  # connections, prepared statements, the responder's first poll
            await bus.request(Ping(i=-1 - i), expect=Pong, timeout=60)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "late": bus.late_replies,
    }


async def in_one_process(url: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    bus = responder(url, args.responder_concurrency)
    async with bus:
        running = asyncio.create_task(bus.run())
        try:
            return await ask(url, args.requests, concurrency, args.warmup)
        finally:
            bus.stop()
            await running


def measure(kind: str, url: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    if kind == "memory":
        return asyncio.run(in_one_process(url, args, concurrency))
    command = [sys.executable, __file__, "--role", "responder", "--url", url]
    command += ["--responder-concurrency", str(args.responder_concurrency)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the responder on {kind} did not start")
        return asyncio.run(ask(url, args.requests, concurrency, args.warmup))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck closing, e.g. reconnecting to a broker that is gone
            process.kill()
            process.wait()


def rabbitmq_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def url_for(kind: str, directory: Path, run: int, rabbitmq: str) -> str:
    if kind == "memory":
        return f"memory://bench-{run}"
    if kind == "sqlite":
        return f"sqlite:///{directory / f'bench-{run}.db'}"
    return f"amqp://guest:guest@{rabbitmq}/?namespace=bench{uuid.uuid4().hex[:8]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--transport", action="append", choices=["memory", "sqlite", "rabbitmq"])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, action="append", help="requests in flight (1, 64)")
    parser.add_argument("--responder-concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rabbitmq", default="127.0.0.1:5672", help="the broker's host:port")
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "responder":
        asyncio.run(serve(args.url, args.responder_concurrency))
        return

    kinds = args.transport or ["sqlite", *(["rabbitmq"] if rabbitmq_answers(args.rabbitmq) else [])]
    levels = args.concurrency or [1, 64]
    print(f"{args.requests:,} requests per run; responder concurrency {args.responder_concurrency}")
    with tempfile.TemporaryDirectory() as name:
        run = 0
        for kind in kinds:
            for concurrency in levels:
                run += 1
                result = measure(kind, url_for(kind, Path(name), run, args.rabbitmq), args, concurrency)
                print(
                    f"  {kind:8} {concurrency:4} in flight: {result['rate']:8,.0f} round trips/s;"
                    f" latency p50 {result['p50_ms']:7.2f} ms, p99 {result['p99_ms']:7.2f} ms"
                    f" (late replies: {result['late']})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
