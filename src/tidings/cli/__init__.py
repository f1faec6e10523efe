"""The `tidings` command line.

tidings run package.module:bus [--concurrency N]
tidings relay package.module:bus
tidings dead-letters list|show ID|replay ID...|replay --all|purge --service NAME [--transport URL]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from tidings.cli import dead_letters
from tidings.errors import TidingsError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="The tidings service bus.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="consume a service's messages until SIGINT/SIGTERM")
    run.add_argument("bus", help="the bus to run, as package.module:attribute")
    run.add_argument("--concurrency", type=int, default=None, help="handlers at once")
    dead_letters.add_command(commands)
    relay = commands.add_parser("relay", help="ship a service's outbox to the broker until SIGINT/SIGTERM")
    relay.add_argument("bus", help="the bus whose outbox to relay, as package.module:attribute")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tidings` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "run":
            from tidings.cli.worker import load_bus, run_worker

            asyncio.run(run_worker(load_bus(args.bus), concurrency=args.concurrency))
        elif args.command == "dead-letters":
            return dead_letters.run_command(args)
        elif args.command == "relay":
            from tidings.cli.worker import load_bus, run_relay

            asyncio.run(run_relay(load_bus(args.bus)))
    except TidingsError as error:
        print(f"tidings: {error}", file=sys.stderr)
        return 2
    return 0
