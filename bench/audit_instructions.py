"""Instructions per message on the bus path with audit off and on (callgrind): memory, SQLite, RabbitMQ.

Counted like `telemetry_instructions.py`: one bus publishes events to itself and handles them one
at a time; each contender runs twice under `valgrind --tool=callgrind`, with a small and a large
message count, and the difference divided by the difference in messages is one message's cost,
start-up and imports left out. Audit on: the note on the handler path and, in the shipper's task,
the records and their batches sent to the audit queue on the same transport (flushes by batch
size only, and no heartbeats, so the count does not depend on the clock).
Instructions, unlike a throughput on a shared machine, do not move with the neighbours' load.

    .venv/bin/python bench/audit_instructions.py                   # memory, SQLite, RabbitMQ, ~20 minutes
    .venv/bin/python bench/audit_instructions.py --only memory-off --only memory-on
    .venv/bin/python bench/audit_instructions.py --backlog --small 1000 --large 5000

`--backlog` counts `audit_throughput.py`'s workload instead: the events published first, then
consumed by 16 handlers; the bus's own cost per message is lower there (it takes and settles in
bulk), so the audit's share is larger.
"""

from __future__ import annotations

import argparse
import asyncio

from callgrind import instructions_of

CONTENDERS = ("memory-off", "memory-on", "sqlite-off", "sqlite-on", "rabbitmq-off", "rabbitmq-on")
#: The broker of the rabbitmq contenders (only this process is counted, not the broker's).
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"


async def workload(contender: str, messages: int, directory: str, backlog: bool) -> None:
    from tidings import Bus, Context, Event
    from tidings.audit import AuditSettings

    class Tick(Event):
        n: int

    kind, _, audit = contender.partition("-")
    if kind == "rabbitmq":
        import uuid

        url = f"{RABBITMQ}?namespace=bench-{uuid.uuid4().hex[:8]}&connect_timeout=120"
    else:
        url = "memory://bench" if kind == "memory" else f"sqlite:///{directory}/bus.db"
    settings = AuditSettings(flush_interval=3600) if audit == "on" else False
    # No heartbeats: what is compared is the audit alone.
    concurrency = 16 if backlog else 1
    bus = Bus(
        "bench",
        url,
        telemetry=False,
        audit=settings,
        heartbeat_interval=None,
        concurrency=concurrency,
        prefetch=concurrency * 4 if backlog else 1,
    )
    handled = asyncio.Event()
    count = 0

    @bus.subscribe(Tick)
    async def on_tick(event: Tick, ctx: Context) -> None:
        nonlocal count
        count += 1
        if not backlog or count == messages:
            handled.set()

    if backlog:  # as bench/audit_throughput.py: a backlog first, then 16 handlers take it
        async with bus:
            await asyncio.gather(*(bus.publish(Tick(n=n)) for n in range(messages)))
            running = asyncio.create_task(bus.run())
            await handled.wait()
            bus.stop()
            await running
        return
    async with bus:
        running = asyncio.create_task(bus.run())
        for n in range(messages):
            handled.clear()
            await bus.publish(Tick(n=n))
            await handled.wait()
        bus.stop()
        await running


def instructions(contender: str, messages: int, backlog: bool) -> int:
    mode = ["--backlog"] if backlog else []
    return instructions_of(
        [__file__, "--run", contender, "--messages", str(messages), "--directory", "{scratch}", *mode],
        what=f"{contender} with {messages} messages",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=1500)
    parser.add_argument("--only", action="append", choices=CONTENDERS)
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="publish the messages first, then consume them with 16 handlers (as audit_throughput.py)",
    )
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        asyncio.run(workload(args.run, args.messages, args.directory, args.backlog))
        return
    per_message: dict[str, float] = {}
    for contender in args.only or CONTENDERS:
        small = instructions(contender, args.small, args.backlog)
        large = instructions(contender, args.large, args.backlog)
        per_message[contender] = (large - small) / (args.large - args.small)
        print(f"{contender:<10} {per_message[contender] / 1e3:8.1f} k instructions per message", flush=True)
    for kind in ("memory", "sqlite", "rabbitmq"):
        off, on = per_message.get(f"{kind}-off"), per_message.get(f"{kind}-on")
        if off and on:
            extra = (on - off) / 1e3
            print(f"{kind}: audit on costs {extra:.1f} k instructions per message ({on / off:.3f}x): at")
            print(f"  equal speed per instruction, {off / on:.2f}x the throughput without audit")


if __name__ == "__main__":
    main()
