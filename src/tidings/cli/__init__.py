"""The `tidings` command line (docs/cli.md).

tidings [--log-level LEVEL] COMMAND ...

    run package.module:bus [--transport URL] [--concurrency N]
    relay package.module:bus [--transport URL]
    tables create package.module:bus
    topology package.module:bus [--json]
    dead-letters list|show ID|replay ID...|replay --all|purge --service NAME [--transport URL]
    asyncapi package.module:bus ... [--transport URL] [--yaml]

Each command is a module with `add_command(commands)`, which adds its parser to the subparsers and
sets `run`, the function that carries it out (`args -> exit code`); `main` parses, configures
logging and calls it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from tidings.cli import asyncapi, dead_letters, tables, topology, worker
from tidings.errors import TidingsError

__all__ = ["main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in `--help`; an option whose default is "not given" says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The parser of `tidings` and of each command under it (subparsers take their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidings", description="The tidings service bus (docs/cli.md).")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"what is logged, to stderr: {', '.join(LOG_LEVELS)} (any case)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker.add_command(commands)
    tables.add_command(commands)
    topology.add_command(commands)
    dead_letters.add_command(commands)
    asyncapi.add_command(commands)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tidings` command; returns the exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args)
    try:
        code: int = args.run(args)
    except worker.UserCodeFailed as error:
        print(f"tidings: {error}\n\n{error.traceback}", file=sys.stderr, end="")
        return 2
    except TidingsError as error:
        print(f"tidings: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # a Ctrl-C outside the worker's own signal handling (a prompt, an import)
    return code
