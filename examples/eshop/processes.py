"""Start the eshop's processes, listen to what they print, and stop them all, whatever happens.

Each service runs as `python -m examples.eshop.<service>` in a session of its own, so a Ctrl-C in
the terminal reaches only the orchestrator, which then stops the services in order with SIGTERM
(each finishes its in-flight messages and exits 0) instead of all of them at once mid-message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from examples.eshop.service import Names

ROOT = Path(__file__).resolve().parents[2]

#: The services in start order.
SERVICES = ("catalog", "basket", "ordering", "payment", "gateway")
#: How long a service may take to start (imports, database, topology) and to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

Listener = Callable[[Mapping[str, Any]], None]


@dataclass(slots=True)
class Service:
    name: str
    process: asyncio.subprocess.Process
    log: Path
    stats: Path
    ready: asyncio.Future[Mapping[str, Any]]
    reader: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Deployment:
    """The five processes of one eshop: `async with Deployment(...) as eshop:` starts and stops them."""

    transport: str
    workdir: Path
    names: Names
    #: Called with every JSON line a service prints (traces, ready, stopped).
    listener: Listener
    #: Extra command-line options per service, e.g. {"payment": ["--limit", "300"]}.
    options: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Where every service records its OpenTelemetry spans (`tracing.py`); None: nowhere.
    trace_dir: Path | None = None
    services: dict[str, Service] = field(default_factory=dict)
    #: Exit codes of the stopped processes, by service.
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def database(self, service: str) -> Path:
        return self.workdir / f"{service}.db"

    @property
    def gateway_url(self) -> str:
        return str(self.services["gateway"].ready.result()["url"])

    async def __aenter__(self) -> Self:
        try:
            for name in SERVICES:
                await self._start(name)
            # Not wait_for(gather(...)): cancelled by a Ctrl-C, it leaves the gather's error unretrieved.
            async with asyncio.timeout(START_TIMEOUT):
                for service in self.services.values():
                    await service.ready
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start(self, name: str) -> None:
        log = self.workdir / f"{name}.log"
        stats = self.workdir / f"{name}.stats.json"
        command = [sys.executable, "-m", f"examples.eshop.{name}", "--transport", self.transport]
        # "--suffix=..." in one word: a suffix may start with a dash.
        command += [f"--suffix={self.names.suffix}", f"--stats={stats}", *self.options.get(name, ())]
        if self.trace_dir is not None:
            command += ["--trace-dir", str(self.trace_dir)]
        if name != "gateway":
            command += ["--db", str(self.database(name))]
        with log.open("w") as errors:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=errors, start_new_session=True
            )
        service = Service(name, process, log, stats, asyncio.get_running_loop().create_future())
        service.reader = asyncio.create_task(self._read(service))
        self.services[name] = service

    async def _read(self, service: Service) -> None:
        assert service.process.stdout is not None
        async for raw in service.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # not one of ours (a stray print): the trace is made of JSON lines only
            if line.get("kind") == "ready" and not service.ready.done():
                service.ready.set_result(line)
            self.listener(line)
        if not service.ready.done():
            code = await service.process.wait()
            tail = service.log.read_text().strip().splitlines()[-15:]
            service.ready.set_exception(
                RuntimeError(f"{service.name} exited with {code} before it was ready:\n" + "\n".join(tail))
            )

    async def stop(self) -> None:
        """SIGTERM the gateway first (no new calls come in), then the services all at once."""
        first = [service for name, service in self.services.items() if name == "gateway"]
        then = [service for name, service in self.services.items() if name != "gateway"]
        for group in (first, then):
            await asyncio.gather(*(self._stop(service) for service in group))

    async def _stop(self, service: Service) -> None:
        if service.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                service.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(service.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                service.process.kill()  # it had its chance to stop cleanly
                await service.process.wait()
        if service.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service.reader, STOP_TIMEOUT)
        if not service.ready.done():
            service.ready.cancel()
        elif not service.ready.cancelled():
            service.ready.exception()  # seen: asyncio would otherwise log it as never retrieved
        self.exit_codes[service.name] = service.process.returncode

    def stats(self) -> dict[str, dict[str, int]]:
        """Each service's last `bus.stats` (written by the service as it runs and when it stops)."""
        out: dict[str, dict[str, int]] = {}
        for name, service in self.services.items():
            with contextlib.suppress(FileNotFoundError, ValueError):
                data = json.loads(service.stats.read_text())
                out[name] = {key: value for key, value in data.items() if isinstance(value, int)}
        return out
