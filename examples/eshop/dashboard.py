"""`scripts/demo --dashboard`: the eshop with audit on, and `tidings dashboard` beside it.

The dashboard starts first (as its own process, in a session of its own like the services), every
process of the shop gets `TIDINGS_AUDIT=1`, and once the scenario is over the dashboard stays up,
its address printed, until Ctrl-C or SIGTERM: then it is stopped, and the demo exits as the run
went (0 when everything was as expected and the dashboard exited 0), since that is how it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import TextIO

from examples.eshop.processes import ROOT, STOP_TIMEOUT


class DashboardProcess:
    """`tidings dashboard` over the shop's transport, with its store in the demo's folder."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    @classmethod
    async def start(cls, transport: str, workdir: Path, port: int) -> DashboardProcess:
        os.environ["TIDINGS_AUDIT"] = "1"  # for every process the demo starts from now on
        command = [sys.executable, "-m", "tidings", "dashboard", "--transport", transport]
        command += ["--store", f"sqlite:///{workdir / 'dashboard.db'}", "--port", str(port)]
        with (workdir / "dashboard.log").open("w") as errors:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=errors, start_new_session=True
            )
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        found = re.search(r"dashboard at (\S+)", line)
        if found is None:
            await process.wait()
            log = (workdir / "dashboard.log").read_text().strip()
            raise RuntimeError(f"the dashboard did not start (exit code {process.returncode}): {log}")
        return cls(process, found.group(1))

    async def stay(self, out: TextIO) -> None:
        """Say where the dashboard is, and wait for Ctrl-C or SIGTERM (or the dashboard's end)."""
        # Here Ctrl-C is the way the demo ends, not an interruption of it: caught as a signal (a
        # second one too, while `stop` runs) rather than cancelling the run into exit code 130.
        loop = asyncio.get_running_loop()
        asked = asyncio.Event()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, asked.set)
        print(f"\nThe dashboard is at {self.url} (Ctrl-C to stop it)", file=out, flush=True)
        exited = asyncio.ensure_future(self.process.wait())
        stop = asyncio.ensure_future(asked.wait())
        try:
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            stop.cancel()

    async def stop(self) -> int:
        """Stop the dashboard (SIGTERM, then SIGKILL after a while); its exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -1
