"""What every eshop service process shares: options, names, its database, tracing, stats, running.

A service process is started as `python -m examples.eshop.<service> --transport URL --db PATH`
(plus `--suffix`, `--stats`, `--trace-dir`: see `tracing.py`). It prints one JSON line per event
worth showing on stdout: `ready` once its queue and bindings are declared, then a `trace` line per
handler call. `run.py` reads these lines; a human can read them too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, String, TypeDecorator, event
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from tidings import Bus, Context, Message, Next
from tidings.cli.worker import run_worker

__all__ = [
    "Money",
    "Names",
    "ServiceOptions",
    "emit",
    "open_database",
    "parse_options",
    "serve",
    "service_bus",
    "start_tracing",
    "trace",
    "write_stats",
]

#: How often a running service rewrites its stats file: often enough for `run.py` to wait on it.
STATS_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class Names:
    """The service (and queue) names of one eshop deployment.

    A suffix keeps two deployments on one broker apart (the tests run one per test), since queues
    are named after services.
    """

    suffix: str = ""

    @property
    def catalog(self) -> str:
        return "catalog" + self.suffix

    @property
    def basket(self) -> str:
        return "basket" + self.suffix

    @property
    def ordering(self) -> str:
        return "ordering" + self.suffix

    @property
    def payment(self) -> str:
        return "payment" + self.suffix

    @property
    def gateway(self) -> str:
        return "gateway" + self.suffix

    @property
    def tap(self) -> str:
        """The demo's own listener (run.py), which captures a message to deliver it twice."""
        return "demo-tap" + self.suffix


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceOptions:
    """The command-line options every service process takes."""

    transport: str
    database: Path | None
    names: Names
    stats: Path | None
    #: Where this process records its OpenTelemetry spans (None: it records none).
    trace_dir: Path | None
    #: Options only one service understands (`--limit` for payment, ...), by name.
    extra: dict[str, Any]


def parse_options(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    database: str | None,
    extra: argparse.ArgumentParser | None = None,
) -> ServiceOptions:
    """Read the common options (and a service's own, from `extra`) from the command line.

    `database` is the default file of the service's database; None for a service without one.
    """
    parser = argparse.ArgumentParser(description=description, parents=[extra] if extra else [])
    parser.add_argument("--transport", default=os.environ.get("TIDINGS_TRANSPORT", "sqlite:///eshop-bus.db"))
    if database is not None:
        parser.add_argument("--db", type=Path, default=Path(database), help="this service's SQLite file")
    parser.add_argument("--suffix", default="", help="appended to every service name (test isolation)")
    parser.add_argument("--stats", type=Path, default=None, help="keep bus.stats as JSON in this file")
    parser.add_argument("--trace-dir", type=Path, default=None, help="record OpenTelemetry spans here")
    args = vars(parser.parse_args(argv))
    return ServiceOptions(
        transport=args.pop("transport"),
        database=args.pop("db", None),
        names=Names(args.pop("suffix")),
        stats=args.pop("stats"),
        trace_dir=args.pop("trace_dir"),
        extra=args,
    )


def start_tracing(options: ServiceOptions, service: str) -> None:
    """Record this process's spans when `--trace-dir` asks for it (before any bus is made)."""
    if options.trace_dir is not None:
        from examples.eshop import tracing  # the OpenTelemetry SDK, only for a traced run

        tracing.start_tracing(options.trace_dir, service)


def emit(kind: str, **fields: Any) -> None:
    """Print one JSON line for run.py (and whoever watches) to read."""
    print(json.dumps({"kind": kind, "t": time.time(), **fields}, default=str), flush=True)


def open_database(path: Path) -> AsyncEngine:
    """An engine for the service's own SQLite file, set up for several writers.

    WAL lets readers (the demo's final check) read while the service writes. Every transaction
    starts with BEGIN IMMEDIATE: SQLite's default deferred BEGIN takes the write lock only at the
    first write, and two transactions that both read first then deadlock on the upgrade, one of
    them failing at once instead of waiting for the other (the busy timeout cannot help there).
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN instead of the driver's implicit one.
        connection.isolation_level = None
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Money(TypeDecorator[Decimal]):
    """An amount of money, exact to the cent. SQLite has no decimal type (NUMERIC becomes a float),
    so amounts are kept as text: "3.50" stays 3.50, never 3.4999999."""

    impl = String(24)
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> str | None:
        return None if value is None else str(Decimal(value).quantize(CENT))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


CENT = Decimal("0.01")


async def create_schema(engine: AsyncEngine, metadata: MetaData) -> None:
    """Create the service's own tables if missing (a real service would run migrations)."""
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)


def service_bus(service: str, transport: str, database: AsyncEngine, **options: Any) -> Bus:
    """A service's bus: with its database (outbox and inbox) and the trace around every delivery."""
    # Order matters: `middleware=` runs outside the inbox the bus adds for its database, so `trace`
    # sees duplicates too; `use()` adds inside it, so `_handler_called` runs only when the handler does.
    bus = Bus(service, transport, database=database, middleware=(trace,), **options)
    bus.use(_handler_called)
    return bus


_CALLED = "eshop.handler-called"


async def _handler_called(ctx: Context, message: Message, call_next: Next) -> Any:
    ctx.items[_CALLED] = True
    return await call_next(ctx, message)


async def trace(ctx: Context, message: Message, call_next: Next) -> Any:
    """Middleware: one `trace` line per delivery handled, with its outcome and timings."""
    started = time.time()
    envelope = ctx.envelope
    fields = {
        "service": ctx.service,
        "type": envelope.type,
        "id": envelope.id,
        "correlation_id": ctx.correlation_id,
        "source": envelope.source,
        "attempt": ctx.attempt,
        # How long the message waited between being created and this handler call.
        "queued_ms": round((started - envelope.time.timestamp()) * 1000, 1),
        "sent_at": envelope.time.timestamp(),
    }
    try:
        result = await call_next(ctx, message)
    except Exception as error:
        emit("trace", outcome="failed", error=f"{type(error).__name__}: {error}", **fields)
        raise
    # The inbox acknowledged a message it had recorded before without calling the handler.
    outcome = "ok" if ctx.items.get(_CALLED) else "duplicate"
    emit("trace", outcome=outcome, took_ms=round((time.time() - started) * 1000, 1), **fields)
    return result


def write_stats(bus: Bus, path: Path) -> None:
    stats = {"service": bus.service, **dataclasses.asdict(bus.stats), "late_replies": bus.late_replies}
    # Write then rename: a reader never sees half a file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(stats))
    temporary.replace(path)


async def _keep_stats(bus: Bus, path: Path) -> None:
    while True:
        write_stats(bus, path)
        await asyncio.sleep(STATS_INTERVAL)


async def serve(bus: Bus, *, stats: Path | None) -> None:
    """Declare the bus's topology, say `ready`, and consume until SIGINT/SIGTERM."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format=f"%(asctime)s {bus.service} %(name)s: %(message)s"
    )
    # Declared before `ready`: once run.py hears it, messages for this service have somewhere to go.
    await bus.start()
    emit("ready", service=bus.service, pid=os.getpid())
    keeper = asyncio.create_task(_keep_stats(bus, stats)) if stats else None
    try:
        await run_worker(bus)
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if stats is not None:
            write_stats(bus, stats)
        emit("stopped", service=bus.service)


async def serve_with_database(bus: Bus, engine: AsyncEngine, *, stats: Path | None) -> None:
    """Create the bus's outbox and inbox tables, serve until a signal, then close the database."""
    await bus.create_tables()
    try:
        await serve(bus, stats=stats)
    finally:
        await engine.dispose()
