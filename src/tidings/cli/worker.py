"""Running a bus as a worker process (`tidings run`, `tidings relay`): load it by path, work until
SIGINT/SIGTERM.

On a signal the worker stops taking messages, lets the in-flight handlers finish and settle their
messages (within the bus's `shutdown_grace`), disconnects and returns (exit code 0). A second
signal ends the grace at once: the handlers still running are cancelled and their messages
released, for another instance to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import sys

from tidings.bus import Bus
from tidings.errors import ConfigurationError

__all__ = ["load_bus", "run_relay", "run_worker"]


def load_bus(path: str) -> Bus:
    """Import `package.module:attribute` and return the `Bus` it names."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected 'package.module:bus', got {path!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory are found
    module = importlib.import_module(module_name)
    bus = getattr(module, attribute, None)
    if not isinstance(bus, Bus):
        raise ConfigurationError(f"{path!r} is {type(bus).__name__}, not a tidings Bus")
    return bus


async def run_worker(bus: Bus, *, concurrency: int | None = None) -> None:
    """Run `bus` until SIGINT or SIGTERM, then stop cleanly."""
    if concurrency is not None:
        if concurrency < 1:
            raise ConfigurationError("--concurrency must be at least 1")
        bus.concurrency = concurrency
        bus.prefetch = max(bus.prefetch, concurrency)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, bus.stop)
    try:
        async with bus:
            await bus.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def run_relay(bus: Bus) -> None:
    """Run `bus`'s outbox relay alone (`tidings relay`) until SIGINT or SIGTERM."""
    relay = bus.relay
    if relay is None:
        raise ConfigurationError(f"service {bus.service!r} has no database: Bus(..., database=engine)")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        async with bus:
            relaying = asyncio.create_task(relay.run())
            waiting = asyncio.create_task(stopping.wait())
            await asyncio.wait({relaying, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
