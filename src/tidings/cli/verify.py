"""`tidings verify`: run the ledger harness against the user's own broker and database.

    tidings verify --transport amqp://app:secret@rabbit/ --database postgresql://app@db/shop \
        --messages 10000 --producers 2 --consumers 2 --kill-consumers-every 5

It sends `--messages` commands from `--producers` processes (half plainly with the broker's
confirm, half through the outbox with a business row), applies them with the inbox in
`--consumers` processes (SIGKILLing one every `--kill-consumers-every` seconds, started again at
once), shows its progress on stderr while it goes (restart the broker or the database meanwhile
to see them recover), and ends with one line on stdout:

    verify: sent N, handled N, lost 0, duplicate deliveries D, duplicate effects 0, dead-lettered 0

Exit 0 when nothing was lost, applied twice or dead-lettered; 1 otherwise (the processes' logs are
then kept, and named). Everything it creates (queues, tables, rows) is named after the run and
removed at the end. docs/verify.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from tidings.errors import ConfigurationError
from tidings.transports.urls import redact_url
from tidings.verify.databases import shown
from tidings.verify.run import Progress, Run, RunSettings

__all__ = ["add_command", "verify"]

#: Seconds between two progress lines.
PROGRESS_EVERY = 2.0


def add_command(commands: Any) -> None:
    """Add `verify` to the `tidings` command's subparsers."""
    parser = commands.add_parser(
        "verify",
        help="prove on your broker and database that no message is lost or applied twice",
        description="Send messages from producer processes (plainly and through the outbox) to "
        "consumer processes (with the inbox), record every one, and check that each confirmed "
        "message was handled once. Restart the broker or the database while it runs to see them "
        "recover. Exit 0: nothing lost, applied twice or dead-lettered; 1 otherwise (docs/verify.md).",
    )
    parser.add_argument(
        "--transport", required=True, metavar="URL", help="the broker: amqp://... or sqlite:///..."
    )
    parser.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="postgresql://... or sqlite:///path.db, for the outbox, the inbox and the ledger "
        "(default: a SQLite file in a temporary directory)",
    )
    parser.add_argument("--messages", type=int, default=1000, metavar="N", help="messages to send")
    parser.add_argument("--producers", type=int, default=2, metavar="P", help="producer processes")
    parser.add_argument("--consumers", type=int, default=2, metavar="C", help="consumer processes")
    parser.add_argument(
        "--kill-consumers-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="SIGKILL a random consumer this often (it is started again at once)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="PER_SECOND",
        help="messages per second, all producers together (0: as fast as they go); slow it down "
        "to have time to restart things",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "plain", "outbox"),
        default="both",
        help="how the producers send: plainly with the broker's confirm, through the outbox, or alternating",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when nothing moved for this long (a broker or database that stays down)",
    )
    parser.add_argument(
        "--negative-control",
        choices=("unconfirmed", "no-inbox", "ack-before-effect"),
        default=None,
        help="break one guarantee on purpose, to see the check fail: count sends as confirmed "
        "before the broker did, consume without the inbox, or acknowledge before the effect",
    )
    parser.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    for name in ("messages", "producers", "consumers"):
        if getattr(args, name) < 1:
            raise ConfigurationError(f"--{name} must be at least 1")
    return asyncio.run(verify(args, sys.stdout, sys.stderr))


async def verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the ledger against `args.transport` and `args.database`; returns the exit code."""
    directory = Path(tempfile.mkdtemp(prefix="tidings-verify-"))
    database = args.database or f"sqlite:///{directory / 'verify.db'}"
    control = args.negative_control
    settings = RunSettings(
        transport=args.transport,
        database=database,
        directory=directory / "logs",
        messages=args.messages,
        producers=args.producers,
        consumers=args.consumers,
        mode=args.mode,
        rate=args.rate,
        producer_control=control if control == "unconfirmed" else None,
        consumer_control=control if control in ("no-inbox", "ack-before-effect") else None,
    )
    run = Run(settings)
    err.write(
        f"verify: run {settings.run}: {args.messages} messages, {args.producers} producers, "
        f"{args.consumers} consumers, on {redact_url(args.transport)} with {shown(database)}\n"
    )
    try:
        await run.setup()
    except Exception as error:
        await run.engine.dispose()
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(error, ConfigurationError):
            raise
        raise ConfigurationError(f"cannot set up the run: {type(error).__name__}: {error}") from error
    complete = False
    try:
        await run.start()
        killing = asyncio.create_task(_kill_every(run, args.kill_consumers_every))
        try:
            complete = await run.settle(patience=args.patience, show=_Shower(run, err))
        finally:
            killing.cancel()
            await asyncio.gather(killing, return_exceptions=True)
            await run.stop()
        report = await run.report()
    finally:
        with contextlib.suppress(Exception):  # a broker or database gone now: say so, not this
            await run.teardown()
    for line in report.details():
        err.write(f"verify: {line}\n")
    err.write(f"verify: consumers killed {run.kills}, processes started again {sum(run.restarts.values())}\n")
    if not complete:
        err.write(f"verify: gave up: nothing moved for {args.patience:g} s\n")
    ok = report.ok and complete
    if ok:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        err.write(f"verify: the processes' logs are in {settings.directory}\n")
    out.write(report.verify_line() + "\n")
    return 0 if ok else 1


async def _kill_every(run: Run, seconds: float | None) -> None:
    if not seconds:
        return
    while True:
        await asyncio.sleep(seconds)
        run.kill_consumer()


class _Shower:
    """Writes a progress line every `PROGRESS_EVERY` seconds."""

    def __init__(self, run: Run, err: TextIO) -> None:
        self.run = run
        self.err = err
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        self.err.write(
            f"verify: {now - self.started:5.0f} s  {progress.describe()}, consumers killed {self.run.kills}\n"
        )
        self.err.flush()
