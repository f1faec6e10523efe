"""`serve`: the dashboard as a process: the transport, the store, ingestion, retention, the web server.

    await serve(DashboardSettings(transport="sqlite:///shop.db"))    # until SIGINT/SIGTERM

Ingestion and retention run beside the web server in the same event loop; on a signal the server
stops taking connections (open event streams are ended), then ingestion stops (a batch being
stored is acknowledged or left on the queue, never half done) and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn

from tidings.audit import AUDIT_QUEUE, HEARTBEAT_TYPE
from tidings.dashboard.app import Parts, make_app
from tidings.dashboard.failed import FailedMessages
from tidings.dashboard.ingest import Ingest
from tidings.dashboard.live import Live
from tidings.dashboard.retention import Retention
from tidings.dashboard.security import Guard
from tidings.dashboard.store import DEFAULT_STORE, Store
from tidings.transports import transport_from_url

__all__ = ["DashboardSettings", "serve"]

#: Seven days of records by default.
DEFAULT_RETENTION = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardSettings:
    transport: str
    store: str = DEFAULT_STORE
    host: str = "127.0.0.1"
    port: int = 8088
    #: Seconds audit records are kept.
    retention: float = DEFAULT_RETENTION
    #: Required on replay and purge when set (always set when listening beyond loopback).
    token: str | None = None
    queue: str = AUDIT_QUEUE


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal only stops it: uvicorn would raise the signal again once
    stopped, killing the process before ingestion and the store are closed. `on_exit` is told at
    the signal: open event streams would otherwise hold the shutdown for its whole grace."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.on_exit()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(settings: DashboardSettings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the dashboard until SIGINT/SIGTERM (or cancellation); `ready(url)` once it listens."""
    transport = transport_from_url(settings.transport)
    store = await Store.open(settings.store)
    live = Live()
    try:
        async with transport:
            parts = Parts(store, FailedMessages(transport), live, Guard(settings.token), transport.url)
            sock = _bind(settings.host, settings.port)
            config = uvicorn.Config(
                make_app(parts), lifespan="off", log_level="warning", timeout_graceful_shutdown=2
            )
            server = _Server(config, live.close)
            ingest = Ingest(transport, store, live, queue=settings.queue)
            # The heartbeats come to a queue of this dashboard's own: every bus publishes them,
            # and with no dashboard bound, none is kept anywhere.
            beats = Ingest(
                transport,
                store,
                live,
                queue=f"{settings.queue}.heartbeats-{uuid.uuid4().hex[:8]}",
                temporary=True,
                events=[HEARTBEAT_TYPE],
            )
            retention = Retention(store, keep=settings.retention)
            tasks = [asyncio.create_task(job.run()) for job in (ingest, beats, retention)]
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            if ready is not None:
                ready(f"http://{shown}:{port}/")
            try:
                await server.serve(sockets=[sock])
            finally:
                live.close()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                sock.close()
    finally:
        await store.close()
