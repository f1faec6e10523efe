"""A service for the worker tests: `tidings run tests.worker_app:bus` with $APP_URL and $APP_OUT."""

from __future__ import annotations

import asyncio
import os

from tidings import Bus, Command, Context


class SlowJob(Command):
    job_id: int


bus = Bus(os.environ.get("APP_SERVICE", "worker"), os.environ.get("APP_URL", "memory://"))


@bus.handle(SlowJob)
async def slow(job: SlowJob, ctx: Context) -> None:
    with open(os.environ["APP_OUT"], "a") as out:
        out.write(f"started {job.job_id}\n")
    await asyncio.sleep(1.0)
    with open(os.environ["APP_OUT"], "a") as out:
        out.write(f"done {job.job_id}\n")
