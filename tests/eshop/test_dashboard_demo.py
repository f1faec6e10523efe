"""`scripts/demo --dashboard` as a user runs it: one OS process (`python -m examples.eshop.run`),
which runs the eshop with audit on, leaves `tidings dashboard` running and prints its address; the
pages answer over HTTP with the shop's services on them; Ctrl-C (SIGINT) ends it all with exit
code 0 and no process left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

SHOP = ("basket", "ordering", "catalog", "payment")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_of(workdir: Path) -> dict[int, str]:
    """The processes (pid: command line) that name `workdir`: the demo, its services and its
    dashboard are each given their databases there."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(workdir) in command:
                found[int(entry.name)] = command
    return found


async def test_the_demo_leaves_the_dashboard_running_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "examples.eshop.run", "--dashboard", "--dashboard-port", str(port)]
    demo = await asyncio.create_subprocess_exec(
        *command,
        "--workdir",
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert demo.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not (found := re.search(r"The dashboard is at (http://\S+)", "".join(printed[-1:]))):
                line = (await demo.stdout.readline()).decode()
                assert line, f"the demo ended (exit code {await demo.wait()}):\n{''.join(printed)}"
                printed.append(line)
        url = found.group(1).rstrip("/")
        assert url == f"http://127.0.0.1:{port}"
        assert any("everything as expected" in line for line in printed), "".join(printed)

        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with asyncio.timeout(30):  # the last records may still be on their way in
                while True:
                    page = await client.get("/")
                    assert page.status_code == 200
                    shown = set(re.findall(r'<tr data-service="([^"]+)"', page.text))
                    if shown >= set(SHOP):
                        break
                    await asyncio.sleep(0.3)
            failed = await client.get("/failed")
            assert failed.status_code == 200

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(60):
            rest = (await demo.stdout.read()).decode()
            code = await demo.wait()
        assert code == 0, "".join(printed) + rest
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
        left = processes_of(tmp_path)
        for pid in left:  # this test's own (the demo's children), not to outlive a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Every service and the dashboard (in sessions of their own) are gone with it.
    assert left == {}
