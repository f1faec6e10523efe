"""The dashboard as a real process (`python -m tidings dashboard`), for the tests."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT


@dataclass
class Running:
    process: subprocess.Popen[str]
    url: str
    #: The first line it printed (the address, and a token when it made one).
    line: str


@contextlib.contextmanager
def dashboard(transport: str, store: Path, *options: str) -> Iterator[Running]:
    """Start the dashboard on a free port; stop it with SIGTERM afterwards (it must exit 0)."""
    command = [sys.executable, "-m", "tidings", "dashboard", "--transport", transport]
    command += ["--store", f"sqlite:///{store}", "--port", "0", *options]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"dashboard at (http://\S+)", line)
        assert found, f"the dashboard did not start (exit code {process.poll()}): {line!r}"
        # Reached through 127.0.0.1 even when it listens on every address.
        url = found.group(1).replace("0.0.0.0", "127.0.0.1").rstrip("/")
        yield Running(process, url, line)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            if process.stdout is not None:
                process.stdout.close()
    assert code == 0, f"the dashboard exited with {code}"
