"""A consumer process that dies (`os._exit`) on a poison message, run by `test_poison`.

    python -m tests.recoverability.poison_worker URL SERVICE OUT [--defaults]

It handles `Job`: a job whose note is "poison" writes `poison <pid>` to OUT and kills the process
on the spot (nothing settled, no cleanup), any other job writes `good <n>`. One message at a time
(`concurrency=1, prefetch=1`), so the poison message is the only one a death leaves unsettled;
with `--defaults`, the bus's default concurrency and prefetch, and good jobs that take a moment,
so that a death leaves many neighbours unsettled. It prints `ready` once its queue is declared.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from tests.recoverability.app import Job
from tidings import Bus, Context, RetryPolicy
from tidings.cli.worker import run_worker

#: The bus's delivery limit in these tests: small, because each death costs a restart.
MAX_DELIVERIES = 3
#: The exit code of a death by poison (anything else is a real failure of the worker).
POISON_EXIT = 17
POISON = "poison"


def record(out: str, line: str) -> None:
    # One write of one line with O_APPEND: lines from several processes never interleave.
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


#: How long a good job takes with `--defaults`: long enough that a poison message is handled
#: while others are in flight and more are prefetched.
GOOD_JOB_SECONDS = 0.02


def build(url: str, service: str, out: str, *, defaults: bool = False) -> Bus:
    one_at_a_time: dict[str, int] = {} if defaults else {"concurrency": 1, "prefetch": 1}
    bus = Bus(service, url, max_deliveries=MAX_DELIVERIES, retry=RetryPolicy.none(), **one_at_a_time)

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        if job.note == POISON:
            record(out, f"{POISON} {os.getpid()}")
            os._exit(POISON_EXIT)
        if defaults:
            await asyncio.sleep(GOOD_JOB_SECONDS)
        record(out, f"good {job.n}")

    return bus


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("service")
    parser.add_argument("out")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args()
    bus = build(args.url, args.service, args.out, defaults=args.defaults)
    await bus.start()
    print("ready", flush=True)
    await run_worker(bus)


if __name__ == "__main__":
    asyncio.run(main())
