"""The audit feed's cost on the handler path: one bus's throughput with audit off and on, in one run.

    .venv/bin/python bench/audit_throughput.py                       # SQLite and memory, 5,000 events
    .venv/bin/python bench/audit_throughput.py --transport sqlite --messages 20000 --rounds 3
    .venv/bin/python bench/audit_throughput.py --transport rabbitmq     # amqp://guest:guest@127.0.0.1:5672/

For each transport: N events are published first (a backlog), then one bus consumes them all; the
figure is events handled per second, first delivery to last. Rounds alternate off/on so a change in
the machine's load hits both; the ratio is the median audit-on rate over the median audit-off rate
(the goal: 0.9 or more), and the best round over the best round, the steadier of the two on a
machine whose load moves. Each round is also timed in this process's CPU seconds (all its threads:
the SQLite transport's too), which the neighbours' load moves much less than the wall clock: events
per CPU second, audit off and on. With audit on, the records are sent in batches to the audit
queue on the same transport while the handlers run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from tidings import Bus, Context, Event
from tidings.audit import AuditSettings


class Tick(Event, name="bench.audit-tick"):
    n: int


async def one_run(url: str, messages: int, audit: bool) -> tuple[float, float]:
    """Events handled per second of wall clock, and per second of this process's CPU time."""
    publisher = Bus("bench-publisher", url, telemetry=False)
    settings = AuditSettings(queue=f"bench-audit-{uuid.uuid4().hex[:6]}") if audit else False
    bus = Bus(f"bench-{uuid.uuid4().hex[:8]}", url, telemetry=False, audit=settings, concurrency=16)
    handled = 0
    first = first_cpu = 0.0
    done = asyncio.Event()

    @bus.subscribe(Tick)
    async def on_tick(event: Tick, ctx: Context) -> None:
        nonlocal handled, first, first_cpu
        if handled == 0:
            first, first_cpu = time.perf_counter(), time.process_time()
        handled += 1
        if handled == messages:
            done.set()

    await bus.start()  # declared and bound before the backlog is published
    async with publisher:
        await asyncio.gather(*(publisher.publish(Tick(n=i)) for i in range(messages)))
    task = asyncio.create_task(bus.run())
    await done.wait()
    elapsed, cpu = time.perf_counter() - first, time.process_time() - first_cpu
    bus.stop()
    await task
    await bus.close()
    return messages / elapsed, messages / cpu


async def main(args: argparse.Namespace) -> None:
    for kind in args.transport:
        off: list[float] = []
        on: list[float] = []
        off_cpu: list[float] = []
        on_cpu: list[float] = []
        with tempfile.TemporaryDirectory() as directory:
            for round_number in range(args.rounds):
                for audit, rates, cpu_rates in ((False, off, off_cpu), (True, on, on_cpu)):
                    if kind == "sqlite":
                        url = f"sqlite:///{Path(directory) / f'bus-{round_number}-{audit}.db'}"
                    elif kind == "rabbitmq":
                        url = f"{args.rabbitmq}?namespace=bench-{uuid.uuid4().hex[:8]}"
                    else:
                        url = f"memory://{uuid.uuid4().hex}"
                    wall, cpu = await one_run(url, args.messages, audit)
                    rates.append(wall)
                    cpu_rates.append(cpu)
        ratio = statistics.median(on) / statistics.median(off)
        best = max(on) / max(off)
        print(
            f"{kind:8} {args.messages} events: audit off {statistics.median(off):,.0f}/s, "
            f"audit on {statistics.median(on):,.0f}/s: median ratio {ratio:.2f}, best-of ratio {best:.2f} "
            f"(rounds off {[round(r) for r in off]}, on {[round(r) for r in on]})"
        )
        cpu_ratio = statistics.median(on_cpu) / statistics.median(off_cpu)
        print(
            f"{'':8} per CPU second: audit off {statistics.median(off_cpu):,.0f}/s, "
            f"audit on {statistics.median(on_cpu):,.0f}/s: median ratio {cpu_ratio:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", action="append", choices=["sqlite", "memory", "rabbitmq"])
    parser.add_argument("--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parsed = parser.parse_args()
    parsed.transport = parsed.transport or ["sqlite", "memory"]
    asyncio.run(main(parsed))
