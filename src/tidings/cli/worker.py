"""`tidings run` and `tidings relay`: load a bus by its import path, work until SIGINT/SIGTERM.

    tidings run shop.basket:bus --concurrency 8
    tidings relay shop.web:bus --transport amqp://app:secret@rabbit:5672/shop

`load_bus` imports `package.module:attribute` with the working directory first on `sys.path` (as
uvicorn does), so a package next to where the command runs is found without `PYTHONPATH`.

On a signal the worker stops taking messages, lets the in-flight handlers finish and settle their
messages (within the bus's `shutdown_grace`), disconnects and returns (exit code 0). A second
signal ends the grace at once: the handlers still running are cancelled and their messages
released, for another instance to handle. It logs one line when it has started and one when it
has stopped (`tidings.worker`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from tidings.bus import Bus
from tidings.cli.describe import TRANSPORT_VARIABLE, registered, transport_label
from tidings.errors import ConfigurationError
from tidings.logs import logger
from tidings.transports.urls import redact_url

__all__ = ["TRANSPORT_HELP", "UserCodeFailed", "add_command", "load_bus", "run_relay", "run_worker"]

log = logger("tidings.worker")


class UserCodeFailed(ConfigurationError):
    """Importing the user's module raised: `traceback` says where, in their code."""

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


#: `--transport` of the commands that load a bus (see `load_bus`).
TRANSPORT_HELP = (
    f"transport URL, set as ${TRANSPORT_VARIABLE} before the module is imported: a Bus made "
    "without a transport takes it; one whose code names a transport is refused rather than "
    "run elsewhere (default: the bus's own)"
)


def add_command(commands: Any) -> None:
    """Add `run` and `relay` to the `tidings` command's subparsers."""
    run = commands.add_parser(
        "run",
        help="consume a service's messages (and relay its outbox) until SIGINT/SIGTERM",
        description="Consume a service's messages, and relay its outbox, until SIGINT/SIGTERM; "
        "a second signal cancels the handlers still running.",
    )
    run.add_argument("bus", help="the bus to run, as package.module:attribute")
    run.add_argument("--transport", default=None, metavar="URL", help=TRANSPORT_HELP)
    run.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="handlers at once; the prefetch is raised to at least N (default: the bus's, "
        "Bus(concurrency=10))",
    )
    run.set_defaults(run=_run)

    relay = commands.add_parser(
        "relay",
        help="ship a service's outbox to the transport until SIGINT/SIGTERM (nothing consumed)",
        description="Ship a service's outbox to the transport until SIGINT/SIGTERM: for a process "
        "that only publishes and sends (a web app), whose bus does not run.",
    )
    relay.add_argument("bus", help="the bus whose outbox to relay, as package.module:attribute")
    relay.add_argument("--transport", default=None, metavar="URL", help=TRANSPORT_HELP)
    relay.set_defaults(run=_relay)


def _run(args: argparse.Namespace) -> int:
    asyncio.run(run_worker(load_bus(args.bus, transport=args.transport), concurrency=args.concurrency))
    return 0


def _relay(args: argparse.Namespace) -> int:
    asyncio.run(run_relay(load_bus(args.bus, transport=args.transport)))
    return 0


def load_bus(path: str, *, transport: str | None = None) -> Bus:
    """Import `package.module:attribute` and return the `Bus` it names.

    With `transport`, `$TIDINGS_TRANSPORT` is set to it before the import, so a `Bus` made without
    a transport takes it; a bus that ends up on another transport is refused. The bus builds its
    sender, relay and reply queue from its transport when it is made, so the URL has to be there
    before then: replacing the transport afterwards would leave those on the old one.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected package.module:attribute (e.g. shop.basket:bus), got {path!r}")
    if transport is not None:
        os.environ[TRANSPORT_VARIABLE] = transport
    module = _import(module_name)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            buses = [name for name, value in vars(module).items() if isinstance(value, Bus)]
            hint = f" (its buses: {', '.join(buses)})" if buses else ""
            raise ConfigurationError(f"module {module_name} has no attribute {attribute!r}{hint}")
        found = getattr(found, part)
    if not isinstance(found, Bus):
        raise ConfigurationError(f"{path!r} is {type(found).__name__}, not a tidings Bus")
    if transport is not None and found.transport.url not in (transport, redact_url(transport)):
        raise ConfigurationError(
            f"--transport {redact_url(transport)!r}: {path} is on {found.transport.url!r}, named in its "
            f"code; --transport (like ${TRANSPORT_VARIABLE}) applies to a Bus made without a transport, "
            f'like Bus("{found.service}")'
        )
    return found


def _import(module_name: str) -> Any:
    # The working directory first, as `python -m` and uvicorn have it: the `tidings` script's own
    # directory is what Python puts there otherwise.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only when the module named (or a package on its way) is missing; a module missing
        # inside the user's code is their import error, shown as one (below).
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigurationError(
                f"no module {error.name} (looked in the working directory {cwd} first, then sys.path)"
            ) from None
        raise _failed(module_name, error) from None
    except Exception as error:
        raise _failed(module_name, error) from None


def _failed(module_name: str, error: Exception) -> UserCodeFailed:
    # The user's frames only: those of this module and of importlib say nothing about their bug.
    frames = traceback.StackSummary.from_list(
        [
            frame
            for frame in traceback.extract_tb(error.__traceback__)
            if frame.filename not in (__file__, importlib.__file__)
            and not frame.filename.startswith("<frozen importlib")
        ]
    )
    shown = "".join(
        ["Traceback (most recent call last):\n", *frames.format(), *traceback.format_exception_only(error)]
    )
    return UserCodeFailed(f"importing {module_name} failed: {type(error).__name__}: {error}", shown)


@contextlib.contextmanager
def _signals_call(callback: Any) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, callback)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _database_label(bus: Bus) -> str:
    if bus.database is None:
        return "none"
    return bus.database.url.render_as_string(hide_password=True)


async def run_worker(bus: Bus, *, concurrency: int | None = None) -> None:
    """Run `bus` until SIGINT or SIGTERM, then stop cleanly."""
    if concurrency is not None:
        if concurrency < 1:
            raise ConfigurationError("--concurrency must be at least 1")
        bus.concurrency = concurrency
        bus.prefetch = max(bus.prefetch, concurrency)
    with _signals_call(bus.stop):
        async with bus:
            names = registered(bus)
            log.info(
                "worker %s started: transport %s, queue %s, handlers %s, concurrency %d, prefetch %d, "
                "database %s",
                bus.service,
                transport_label(bus.transport),
                bus.queue,
                ", ".join(
                    [*(f"{n} (event)" for n in names.events), *(f"{n} (command)" for n in names.commands)]
                )
                or "none",
                bus.concurrency,
                bus.prefetch,
                _database_label(bus),
            )
            started = time.monotonic()
            try:
                await bus.run()
            finally:
                stats = bus.stats
                relayed = f", {bus.relay.stats.sent} relayed from the outbox" if bus.relay is not None else ""
                log.info(
                    "worker %s stopped after %.1f s: %d handled, %d dead-lettered, %d retries scheduled, "
                    "%d duplicates skipped%s; released %d unfinished at the end of the shutdown grace "
                    "and %d put back while a dependency was unavailable",
                    bus.service,
                    time.monotonic() - started,
                    stats.handled,
                    stats.dead_lettered,
                    stats.retries_scheduled,
                    stats.duplicates,
                    relayed,
                    stats.released,
                    stats.unavailable,
                )


async def run_relay(bus: Bus) -> None:
    """Run `bus`'s outbox relay alone (`tidings relay`) until SIGINT or SIGTERM.

    Only the transport is opened: no queue is declared and nothing is consumed, as befits a
    process that only publishes and sends (its bus need not run at all).
    """
    relay = bus.relay
    if relay is None or bus.database is None:
        raise ConfigurationError(f"service {bus.service!r} has no database: Bus(..., database=engine)")
    from tidings.storage import require_tables

    await require_tables(bus.database)
    stopping = asyncio.Event()
    with _signals_call(stopping.set):
        async with bus.transport:
            log.info(
                "relay for %s started: outbox in %s, transport %s",
                bus.service,
                _database_label(bus),
                transport_label(bus.transport),
            )
            started = time.monotonic()
            relaying = asyncio.create_task(relay.run())
            waiting = asyncio.create_task(stopping.wait())
            try:
                await asyncio.wait({relaying, waiting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                relaying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relaying
                log.info(
                    "relay for %s stopped after %.1f s: %d sent, %d refusals, %d outages",
                    bus.service,
                    time.monotonic() - started,
                    relay.stats.sent,
                    relay.stats.refused,
                    relay.stats.outages,
                )
