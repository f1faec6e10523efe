"""Small helpers the tests share: waiting for a condition, running buses in the background."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tidings import Bus


async def eventually(condition: Callable[[], bool], *, timeout: float = 15.0) -> None:
    """Wait until `condition()` holds; fail the test when it still does not after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(*buses: Bus) -> AsyncIterator[None]:
    """Start the buses, consume in the background, and stop and close them afterwards."""
    for bus in buses:
        await bus.start()
    tasks = [asyncio.create_task(bus.run()) for bus in buses]
    try:
        yield
    finally:
        for bus in buses:
            bus.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()


ROOT = Path(__file__).resolve().parents[1]


class Processes:
    """Starts Python modules as OS processes that print `ready`, and stops every one of them."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, module: str, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        self.started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "ready", f"{module} did not start (exit code {process.poll()})"
        return process

    def stop_all(self) -> None:
        """SIGTERM to the live ones, SIGKILL to any still alive 15 s later."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
