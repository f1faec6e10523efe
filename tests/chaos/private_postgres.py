"""A private PostgreSQL 15 cluster for the scenarios that crash the database.

The shared server (5432) is never stopped: this cluster is made with `initdb` in a temporary
directory, owned by and run as user postgres (`runuser`; initdb refuses root), on a port of its
own from 5795 on, listening on 127.0.0.1 only. `crash()` is `pg_ctl stop -m immediate` (no
shutdown checkpoint: the next start replays the WAL, as after a crash); `start()` waits until it
accepts connections. `fsync=off`: only the server process dies in these tests, never the machine,
so what the server wrote is in the OS's cache either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CI, answers

BIN = Path("/usr/lib/postgresql/15/bin")
PORT_FROM = int(os.environ.get("TIDINGS_TEST_CHAOS_POSTGRES_PORT", "5795"))


class PrivatePostgres:
    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.data = base / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*prefix, *command], check=True, timeout=timeout, capture_output=True, cwd=self.base, text=True
        )

    def init(self) -> None:
        self._as_postgres(
            str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        log = str(self.base / "server.log")
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every server process ends at once, as in a crash."""
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return answers(("127.0.0.1", self.port))

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._as_postgres(
                str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60
            )

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator[PrivatePostgres]:
        if not (BIN / "initdb").exists():
            _unavailable(f"no PostgreSQL 15 in {BIN}: no private cluster")
        port = next((p for p in range(PORT_FROM, PORT_FROM + 40) if not answers(("127.0.0.1", p))), None)
        if port is None:
            _unavailable(f"no free port from {PORT_FROM} on")
            return
        base = Path(tempfile.mkdtemp(prefix="tidings-chaos-postgres-"))
        try:
            if os.geteuid() == 0:
                shutil.chown(base, "postgres", "postgres")
            cluster = cls(base, port)
            try:
                cluster.init()
                cluster.start()
            except (subprocess.SubprocessError, OSError) as error:
                cluster.stop()
                detail = getattr(error, "stderr", "") or error
                _unavailable(f"the private PostgreSQL cluster did not start: {detail}")
            try:
                yield cluster
            finally:
                cluster.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason} (CI is set: the private PostgreSQL cluster must start)")
    pytest.skip(reason)
