"""`tidings run`: consume until a signal, then finish in-flight messages, settle them, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import eventually, running
from tests.worker_app import SlowJob
from tidings import Bus, Context, NoRoute

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_the_in_flight_message_finish_and_settle(
    signum: signal.Signals, tmp_path: Path, name: Callable[[str], str]
) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    out = tmp_path / "out.txt"
    service = name("worker")
    env = {**os.environ, "APP_URL": url, "APP_OUT": str(out), "APP_SERVICE": service}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", "run", "tests.worker_app:bus", "--concurrency", "2"],
        cwd=ROOT,
        env=env,
    )
    try:
        async with Bus(name("client"), url) as client:
            client.route(SlowJob, to=service)
            await _send_once_declared(client, SlowJob(job_id=1))
            await eventually(lambda: out.exists() and "started 1" in out.read_text())
            worker.send_signal(signum)
            assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert out.read_text().splitlines() == ["started 1", "done 1"]

    # Settled means acknowledged: another instance on the same queue finds nothing to do.
    again = Bus(service, url)
    redelivered: list[int] = []

    @again.handle(SlowJob)
    async def record(job: SlowJob, ctx: Context) -> None:
        redelivered.append(job.job_id)

    async with running(again):
        await asyncio.sleep(1.0)
    assert redelivered == []


async def _send_once_declared(client: Bus, job: SlowJob) -> None:
    """The worker declares its queue when it starts; until then a send has no route."""
    for _ in range(300):
        try:
            await client.send(job)
            return
        except NoRoute:
            await asyncio.sleep(0.05)
    raise AssertionError("the worker never declared its queue")


def test_run_refuses_something_that_is_not_a_bus() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tidings.cli", "run", "tests.worker_app:SlowJob"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "not a tidings Bus" in result.stderr
